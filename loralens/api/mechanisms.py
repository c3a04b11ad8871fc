"""Mechanism checks of a lens set (`Lenses.mechanisms`): every head's induction and previous-token scores on
repeated random tokens and its copy rates read alone through the logit lens and the trained lens, and optionally from
its effect on the model's output (`loralens.lens.evaluation.mechanisms`, which defines each number)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from loralens.lens.evaluation.mechanisms import COLUMNS, INDUCTION_THRESHOLD, induction_summary, summary_line

SCHEMA = pa.schema([("layer", pa.int16()), ("head", pa.int16())] + [(c, pa.float64()) for c in COLUMNS])


@dataclass(frozen=True)
class Mechanisms:
    """One head per row of `table` (layer, head and the eight `COLUMNS`; null trained columns for a layer without a
    trained lens, null effect columns unless asked for), the model's own next-token top-1 rate at the `n_positions`
    scored positions, the train version whose lenses were read and the input (`batch` sequences of BOS + `seq_len`
    random tokens twice, `seed`)."""

    table: pa.Table
    model_top1: float
    n_positions: int
    train_version: str | None
    batch: int
    seq_len: int
    seed: int

    @classmethod
    def from_rows(cls, rows: list[dict], **info) -> Mechanisms:
        """Return the checks of `mechanism_rows` dicts; `info`: the other fields."""
        return cls(table=pa.Table.from_pylist(rows, schema=SCHEMA), **info)

    def rows(self) -> list[dict]:
        """Return one dict per head (layer, head, the eight `COLUMNS`; None where not measured)."""
        return self.table.to_pylist()

    def summary(self, threshold: float = INDUCTION_THRESHOLD) -> dict:
        """Return `induction_summary` of the heads: induction heads at `threshold`, trained lens (and effect) vs
        logit lens counts at top-1 and top-5, the best copying head per read-out."""
        return induction_summary(self.rows(), threshold)

    def summary_line(self, threshold: float = INDUCTION_THRESHOLD) -> str:
        """Return the summary as one line (e.g. '10 induction heads (score >= 0.3); trained lens >= logit lens at
        top-1 on 6 of 10 ...; best copier L29H1: trained 0.130, logit 0.200')."""
        return summary_line(self.summary(threshold))
