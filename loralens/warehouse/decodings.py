"""Parquet layout of the decode stage and its bulk load into DuckDB.

    decode/<version>/decodings/shard-00000.parquet   one row per (position, layer, lens, head, rank)
    decode/<version>/_shards/shard-00000.json        files, rows and sha256 of a finished shard

Shard i of the decode stage reads cache shard i. Each shard lands in the `decodings` table in one
transaction (delete that shard's rows, insert the file with `read_parquet`), so a re-run or a resume after a
kill never inserts a row twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loralens.hashing import file_sha256
from loralens.killpoints import maybe_kill
from loralens.warehouse.artifacts import ArtifactDir, ShardFile, atomic_write_with
from loralens.warehouse.constants import DECODINGS_DIR, shard_name
from loralens.warehouse.db import write_transaction

DECODINGS_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("prompt_idx", pa.int32()), ("position", pa.int32()), ("layer", pa.int16()),
    ("head", pa.int16()), ("lens", pa.string()), ("rank", pa.int16()), ("token_id", pa.int32()),
    ("token", pa.string()), ("logit", pa.float32()), ("prob", pa.float32()),
])


def decodings_block(shard: int, layer: int, lens: str, prompt_idx: np.ndarray, position: np.ndarray,
                    ids: np.ndarray, logits: np.ndarray, probs: np.ndarray, texts: np.ndarray) -> pa.Table:
    """Return the rows of one layer under one lens: ids/logits/probs `[n, H, k]`, prompt_idx/position `[n]`."""
    n, heads, k = ids.shape
    per_pos = heads * k
    return pa.table({
        "shard": pa.array(np.full(n * per_pos, shard, dtype=np.int32)),
        "prompt_idx": pa.array(np.repeat(prompt_idx.astype(np.int32), per_pos)),
        "position": pa.array(np.repeat(position.astype(np.int32), per_pos)),
        "layer": pa.array(np.full(n * per_pos, layer, dtype=np.int16)),
        "head": pa.array(np.tile(np.repeat(np.arange(heads, dtype=np.int16), k), n)),
        "lens": pa.array([lens] * (n * per_pos), pa.string()),
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), n * heads)),
        "token_id": pa.array(ids.reshape(-1).astype(np.int32)),
        "token": pa.array(texts[ids.reshape(-1)], pa.string()),
        "logit": pa.array(logits.reshape(-1).astype(np.float32)),
        "prob": pa.array(probs.reshape(-1).astype(np.float32)),
    }, schema=DECODINGS_SCHEMA)


def shard_relpath(index: int) -> str:
    """Return a decode shard's file, relative to the artifact folder."""
    return f"{DECODINGS_DIR}/{shard_name(index)}.parquet"


def write_decode_shard(adir: ArtifactDir, index: int, table: pa.Table) -> ShardFile:
    """Write one decode shard atomically, then its record; return the file written."""
    rel = shard_relpath(index)
    path = adir.path / rel
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", compression_level=3))
    f = ShardFile(path=rel, rows=table.num_rows, bytes=path.stat().st_size, sha256=file_sha256(path))
    adir.record_shard(index, [f])
    return f


def load_shard_into_db(db: Path, version: str, index: int, path: Path, rows: int) -> bool:
    """Bulk-insert one decode shard unless exactly its rows are there already; return whether it inserted."""
    def write(con) -> bool:
        have = con.execute("SELECT count(*) FROM decodings WHERE version = ? AND shard = ?", [version, index])
        if have.fetchone()[0] == rows:
            return False
        con.execute("DELETE FROM decodings WHERE version = ? AND shard = ?", [version, index])
        con.execute(f"INSERT INTO decodings BY NAME SELECT ? AS version, * FROM read_parquet('{_sql_path(path)}')",
                    [version])
        maybe_kill("db.inserted.decodings")  # inside the transaction: a kill here must roll back
        return True

    return write_transaction(db, write)


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def read_decodings(adir: ArtifactDir, lens: str, columns: list[str]) -> pa.Table:
    """Return the given columns of every decode shard's rows under `lens`."""
    files = sorted((adir.path / DECODINGS_DIR).glob("shard-*.parquet"))
    tables = [pq.read_table(f, columns=[*columns, "lens"], filters=[("lens", "=", lens)]) for f in files]
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in [*columns, "lens"]})
    return table.drop_columns(["lens"]) if "lens" not in columns else table


__all__ = ["DECODINGS_SCHEMA", "decodings_block", "load_shard_into_db", "read_decodings", "shard_relpath",
           "write_decode_shard"]
