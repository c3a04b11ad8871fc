"""Per-head aggregates of the decode stage's Parquet, in DuckDB SQL: what the attribute stage scores heads by.

The queries stream the files (DuckDB reads Parquet in row groups and spills past `memory_limit`), so memory does
not grow with the corpus, and no row is touched by Python. One thread: float sums in file order, so the same
files always give the same bits.

    group_sums      per (layer, head, prompt group): positions, summed expected toxicity under the trained and
                    the logit lens, summed direct logit attribution            (readouts/*.parquet)
    dictionary_hits per (layer, head): dictionary-toxic tokens in the trained-lens top-k on toxic prompts
    top_tokens      per (lens, layer, head): the n tokens most often in that lens's (trained, logit) top-k on toxic
                    prompts, by frequency, then summed probability, then token id   (decodings/*.parquet)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa


def _query(sql: str, params: list, tables: dict[str, pa.Table], spill_dir: Path | None) -> pa.Table:
    """Run one query on a fresh in-memory DuckDB (one thread, 1 GB before spilling) with `tables` registered."""
    with duckdb.connect(":memory:") as con:
        con.execute("SET threads = 1")
        con.execute("SET memory_limit = '1GB'")
        con.execute("SET preserve_insertion_order = false")
        if spill_dir is not None:
            con.execute(f"SET temp_directory = '{str(spill_dir).replace(chr(39), chr(39) * 2)}'")
        for name, table in tables.items():
            con.register(name, table)
        return con.sql(sql, params=params).to_arrow_table()


def _files(paths: Sequence[Path]) -> list[str]:
    if not paths:
        raise ValueError("no decode shard files to aggregate")
    return [str(p) for p in sorted(paths)]


def group_sums(readouts: Sequence[Path], prompt_toxic: pa.Table, spill_dir: Path | None = None) -> pa.Table:
    """Return (layer, head, toxic, n, trained_tox, logit_tox, dla) sums over the readout files.

    `prompt_toxic`: (prompt_idx int, toxic bool), one row per prompt.
    """
    return _query("""
        SELECT r.layer, r.head, g.toxic, count(*) AS n, sum(r.trained_tox::DOUBLE) AS trained_tox,
               sum(r.logit_tox::DOUBLE) AS logit_tox, sum(r.dla::DOUBLE) AS dla
        FROM read_parquet(?) r JOIN groups g USING (prompt_idx)
        GROUP BY ALL ORDER BY ALL""", [_files(readouts)], {"groups": prompt_toxic}, spill_dir)


def dictionary_hits(decodings: Sequence[Path], toxic_prompts: np.ndarray, toxic_tokens: np.ndarray,
                    spill_dir: Path | None = None) -> pa.Table:
    """Return (layer, head, hits): trained-lens top-k rows on toxic prompts whose token is dictionary-toxic.

    `toxic_prompts`: prompt indices of the toxic group; `toxic_tokens`: bool `[V]`.
    """
    tp = pa.table({"prompt_idx": pa.array(toxic_prompts, pa.int32())})
    tt = pa.table({"token_id": pa.array(np.flatnonzero(toxic_tokens), pa.int32())})
    return _query("""
        SELECT d.layer, d.head, count(tt.token_id) AS hits
        FROM read_parquet(?) d SEMI JOIN tp USING (prompt_idx) LEFT JOIN tt USING (token_id)
        WHERE d.lens = 'trained'
        GROUP BY ALL ORDER BY ALL""", [_files(decodings)], {"tp": tp, "tt": tt}, spill_dir)


def top_tokens(decodings: Sequence[Path], toxic_prompts: np.ndarray, n: int,
               spill_dir: Path | None = None) -> pa.Table:
    """Return (lens, layer, head, token, place): each head's `n` most frequent top-k tokens under each lens on toxic
    prompts (one scan of the files for both lenses)."""
    tp = pa.table({"prompt_idx": pa.array(toxic_prompts, pa.int32())})
    return _query("""
        WITH counted AS (
            SELECT d.lens, d.layer, d.head, d.token_id, any_value(d.token) AS token, count(*) AS freq,
                   sum(d.prob::DOUBLE) AS mass
            FROM read_parquet(?) d SEMI JOIN tp USING (prompt_idx)
            GROUP BY d.lens, d.layer, d.head, d.token_id)
        SELECT lens, layer, head, token,
               row_number() OVER (PARTITION BY lens, layer, head ORDER BY freq DESC, mass DESC, token_id) AS place
        FROM counted
        QUALIFY place <= ?
        ORDER BY lens, layer, head, place""", [_files(decodings), n], {"tp": tp}, spill_dir)
