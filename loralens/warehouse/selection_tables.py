"""Warehouse rows of the select stage: causal head scores, the greedy selection path, the prompt splits, and the
steering search's trials and first-order scores."""

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


TRIAL_COLUMNS = {"kind": pa.string(), "name": pa.string(), "heads": pa.string(), "edit": pa.string(),
                 "source": pa.string(), "alpha": pa.float64(), "n_heads": pa.int32(), "proxy_drop": pa.float64(),
                 "ppl_rel": pa.float64(), "within_budget": pa.bool_(), "chosen": pa.bool_()}
SCORE_COLUMNS = {"source": pa.string(), "edit": pa.string(), "layer": pa.int32(), "head": pa.int32(),
                 "tox_change": pa.float64(), "nll_change": pa.float64(), "score": pa.float64()}


def _rows_table(version: str, rows: list[dict], columns: dict[str, pa.DataType]) -> pa.Table:
    """Return `rows` (dicts holding `columns`) as a table led by a `version` column."""
    return pa.table({"version": pa.array([version] * len(rows), pa.string()),
                     **{c: pa.array([r[c] for r in rows], t) for c, t in columns.items()}})


def steering_trials_table(version: str, trials: list[dict]) -> pa.Table:
    """Return `steering_trials` rows: one per measured steering condition (kind, condition, measurements, chosen)."""
    return _rows_table(version, trials, TRIAL_COLUMNS)


def steering_scores_table(version: str, rows: list[dict]) -> pa.Table:
    """Return `steering_scores` rows: the first-order table, one per (source, edit, layer, head)."""
    return _rows_table(version, rows, SCORE_COLUMNS)


def store_selection(db: Path, version: str, head_scores: pa.Table, path: pa.Table, splits: pa.Table,
                    steering: dict[str, pa.Table] | None = None) -> None:
    """Replace a select version's rows of its tables (`steering`: `steering_trials`, `steering_scores`, when the
    version steered) in ONE transaction."""
    tables = {"head_scores": head_scores, "selection_path": path, "prompt_splits": splits, **(steering or {})}
    replace_version_rows(db, version, tables)


__all__ = ["selection_path_table", "steering_scores_table", "steering_trials_table", "store_selection"]
