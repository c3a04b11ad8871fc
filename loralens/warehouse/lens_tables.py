"""Warehouse rows of the train stage: the training curve and held-out lens fidelity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from loralens.warehouse.db import replace_version_rows


def curve_table(version: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Return the training curve as a table, keeping the last record of each step (resumed runs repeat)."""
    last = {r["step"]: r for r in rows}
    steps = sorted(last)
    return pa.table({"version": [version] * len(steps), "step": steps,
                     "loss": [float(last[s]["loss"]) for s in steps],
                     "tokens": [int(last[s]["tokens"]) for s in steps]})


def fidelity_table(version: str, fid: dict[str, Any]) -> pa.Table:
    """Return per-head and per-layer (head -1) fidelity rows."""
    rows = []
    for i, layer in enumerate(fid["layers"]):
        for h, (kl, base) in enumerate(zip(fid["head_lens"][i], fid["head_logit_lens"][i], strict=True)):
            rows.append((layer, h, kl, base, None))
        rows.append((layer, -1, fid["layer_lens"][i], fid["layer_logit_lens"][i], fid["layer_subset_kl"][i]))
    cols = list(zip(*rows, strict=True))
    return pa.table({"version": [version] * len(rows), "layer": pa.array(cols[0], pa.int32()),
                     "head": pa.array(cols[1], pa.int32()), "kl_lens": cols[2], "kl_logit_lens": cols[3],
                     "kl_subset": pa.array(cols[4], pa.float64()),
                     "tokens": [int(fid["tokens"])] * len(rows)})


def store_training_results(db: Path, version: str, curve: pa.Table, fidelity: pa.Table) -> None:
    """Replace this version's curve and fidelity rows in one transaction (bulk inserts, idempotent)."""
    replace_version_rows(db, version, {"training_curve": curve, "lens_fidelity": fidelity})
