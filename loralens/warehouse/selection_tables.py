"""Warehouse rows of the select stage: causal head scores, the greedy selection path, the prompt splits."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from loralens.warehouse.db import replace_version_rows


def selection_path_table(version: str, steps: list[dict]) -> pa.Table:
    """Return `selection_path` rows from the greedy selection's steps (dicts with the table's columns)."""
    n = len(steps)

    def col(name, typ):
        return pa.array([s[name] for s in steps], typ)

    return pa.table({
        "version": pa.array([version] * n, pa.string()), "step": col("step", pa.int32()),
        "try": col("try", pa.int32()), "layer": col("layer", pa.int32()), "head": col("head", pa.int32()),
        "proxy_drop": col("proxy_drop", pa.float64()), "emt": col("emt", pa.float64()),
        "emt_drop": col("emt_drop", pa.float64()), "ppl": col("ppl", pa.float64()),
        "ppl_rel": col("ppl_rel", pa.float64()), "accepted": col("accepted", pa.bool_()),
        "reason": col("reason", pa.string()),
    })


def store_selection(db: Path, version: str, head_scores: pa.Table, path: pa.Table, splits: pa.Table) -> None:
    """Replace a select version's rows of the three tables in ONE transaction."""
    replace_version_rows(db, version, {"head_scores": head_scores, "selection_path": path, "prompt_splits": splits})


__all__ = ["selection_path_table", "store_selection"]
