"""Parquet layout of the decode stage and its bulk load into DuckDB.

    decode/<version>/token_toxicity.parquet          one row per vocabulary id: text, kind, toxicity score (the
                                                     pipeline's one vocabulary toxicity: every stage reads it)
    decode/<version>/decodings/shard-00000.parquet   one row per (position, layer, lens, head, rank)
    decode/<version>/readouts/shard-00000.parquet    one row per (position, layer, head): expected token
                                                     toxicity under each lens, direct logit attribution
    decode/<version>/_shards/shard-00000.json        files, rows and sha256 of a finished shard
    decode/<version>/_shards/shard--0001.json        the token toxicity file's record (VOCAB_RECORD)

Shard i of the decode stage reads cache shard i. Each shard's decodings land in the `decodings` table in one
transaction (delete that shard's rows, insert the file with `read_parquet`), so a re-run or a resume after a
kill never inserts a row twice. The readouts stay in Parquet: the attribute stage aggregates them with SQL.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loralens.killpoints import maybe_kill
from loralens.warehouse.artifacts import ArtifactDir, ArtifactError, ShardFile
from loralens.warehouse.constants import DECODINGS_DIR, READOUTS_DIR, TOKEN_TOXICITY_FILE, shard_name
from loralens.warehouse.db import write_transaction
from loralens.warehouse.parquet_files import write_parquet_file

DECODINGS_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("prompt_idx", pa.int32()), ("position", pa.int32()), ("layer", pa.int16()),
    ("head", pa.int16()), ("lens", pa.string()), ("rank", pa.int16()), ("token_id", pa.int32()),
    ("token", pa.string()), ("logit", pa.float32()), ("prob", pa.float32()),
])

READOUTS_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("prompt_idx", pa.int32()), ("position", pa.int32()), ("layer", pa.int16()),
    ("head", pa.int16()), ("trained_tox", pa.float32()), ("logit_tox", pa.float32()), ("dla", pa.float32()),
])
TOKEN_TOXICITY_SCHEMA = pa.schema([
    ("token_id", pa.int32()), ("token", pa.string()), ("kind", pa.string()), ("score", pa.float32()),
])
VOCAB_RECORD = -1  # the shard-record index of the stage-level token toxicity file (cache shards are >= 0)


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


def readouts_block(shard: int, layer: int, prompt_idx: np.ndarray, position: np.ndarray, trained_tox: np.ndarray,
                   logit_tox: np.ndarray, dla: np.ndarray) -> pa.Table:
    """Return the readout rows of one layer: trained_tox/logit_tox/dla `[n, H]`, prompt_idx/position `[n]`."""
    n, heads = dla.shape
    return pa.table({
        "shard": pa.array(np.full(n * heads, shard, dtype=np.int32)),
        "prompt_idx": pa.array(np.repeat(prompt_idx.astype(np.int32), heads)),
        "position": pa.array(np.repeat(position.astype(np.int32), heads)),
        "layer": pa.array(np.full(n * heads, layer, dtype=np.int16)),
        "head": pa.array(np.tile(np.arange(heads, dtype=np.int16), n)),
        "trained_tox": pa.array(trained_tox.reshape(-1).astype(np.float32)),
        "logit_tox": pa.array(logit_tox.reshape(-1).astype(np.float32)),
        "dla": pa.array(dla.reshape(-1).astype(np.float32)),
    }, schema=READOUTS_SCHEMA)


def token_toxicity_table(texts: list[str], kind: np.ndarray, score: np.ndarray, facts: dict) -> pa.Table:
    """Return the token toxicity rows, one per vocabulary id 0..V-1; `facts` (scorer, label, scored pieces) go
    into the file's schema metadata under "loralens"."""
    schema = TOKEN_TOXICITY_SCHEMA.with_metadata({"loralens": json.dumps(facts, sort_keys=True)})
    return pa.table({"token_id": pa.array(np.arange(len(texts), dtype=np.int32)), "token": texts,
                     "kind": pa.array(np.asarray(kind).tolist(), pa.string()),
                     "score": pa.array(np.asarray(score, dtype=np.float32))}, schema=schema)


def read_token_toxicity(decode_dir: ArtifactDir, columns: list[str] | None = None) -> pa.Table:
    """Return a decode version's token toxicity rows, one per vocabulary id in id order (`columns`: all if None).

    Raises ArtifactError naming the file when the decode version has none.
    """
    path = decode_dir.path / TOKEN_TOXICITY_FILE
    if not path.is_file():
        raise ArtifactError(f"decode version {decode_dir.version}: no vocabulary toxicity file {path}; "
                            "run `loralens run --only decode` first")
    return pq.read_table(path, columns=columns)


def token_toxicity_scores(decode_dir: ArtifactDir) -> np.ndarray:
    """Return every vocabulary id's toxicity `[V]` float32 from a decode version's token toxicity file."""
    return read_token_toxicity(decode_dir, ["score"]).column("score").to_numpy().astype(np.float32)


def token_toxicity_facts(decode_dir: ArtifactDir) -> dict:
    """Return the scoring facts stored with the token toxicity file (scorer version, label, pieces scored)."""
    return json.loads(pq.read_schema(decode_dir.path / TOKEN_TOXICITY_FILE).metadata[b"loralens"])


def shard_relpath(index: int, folder: str = DECODINGS_DIR) -> str:
    """Return a decode shard's file (decodings, or `folder=READOUTS_DIR`), relative to the artifact folder."""
    return f"{folder}/{shard_name(index)}.parquet"


def _write(adir: ArtifactDir, rel: str, table: pa.Table) -> ShardFile:
    return write_parquet_file(adir.path, rel, table, compression_level=3)


def write_decode_shard(adir: ArtifactDir, index: int, decodings: pa.Table, readouts: pa.Table) -> list[ShardFile]:
    """Write one decode shard's decodings and readouts atomically, then its record; return [decodings, readouts]."""
    files = [_write(adir, shard_relpath(index), decodings), _write(adir, shard_relpath(index, READOUTS_DIR), readouts)]
    adir.record_shard(index, files)
    return files


def write_token_toxicity(adir: ArtifactDir, table: pa.Table) -> ShardFile:
    """Write the token toxicity file atomically and record it (record VOCAB_RECORD); return it."""
    f = _write(adir, TOKEN_TOXICITY_FILE, table)
    adir.record_shard(VOCAB_RECORD, [f])
    return f


def decode_shards(adir: ArtifactDir) -> dict[int, list[ShardFile]]:
    """Return the finished decode shards (cache shard index -> [decodings, readouts]), without the vocab record."""
    return {i: files for i, files in adir.done_shards().items() if i != VOCAB_RECORD}


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


__all__ = ["DECODINGS_SCHEMA", "READOUTS_SCHEMA", "TOKEN_TOXICITY_SCHEMA", "VOCAB_RECORD", "decode_shards",
           "decodings_block", "load_shard_into_db", "read_token_toxicity", "readouts_block", "shard_relpath",
           "token_toxicity_facts", "token_toxicity_scores", "token_toxicity_table", "write_decode_shard",
           "write_token_toxicity"]
