"""What decoding a text through lenses returns: one table of each head's top tokens at each position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from loralens.api.errors import ApiError
from loralens.api.heads import parse_heads
from loralens.lens.heads.head_sets import Head, format_heads

LENS_ORDER = ("trained", "logit", "effect")  # a head's rows at a position come in this order


@dataclass
class Decoding:
    """Top tokens of some heads at each position of one text, under the trained and the logit lens (and the effect).

    `table` has one row per (position, layer, head, lens, rank): position, input_token, layer, head, lens
    ("trained" | "logit" | "effect"), rank (1 = first), token_id, token, logit, prob, expected_toxicity and
    direct_logit (the head's logit push along the toxic direction, the same for every lens). Under the two lenses
    prob is the full-softmax probability of the head's lens alone, logit its logit, expected_toxicity
    `sum_v p(v) tox(v)`. Under "effect" (`Lenses.decode(effect=True)`) the tokens are those the head adds the most
    probability to in the model's own output (vs the head mean-ablated): prob is that probability added (p - p
    ablated, negative where it takes some away), logit the log-prob lift, expected_toxicity the toxicity it adds
    `sum_v (p - p_ablated)(v) tox(v)`. The toxicity columns are NaN without token toxicity (a decode version of
    these lenses, or one saved with them). `tokens` are the text's tokens.
    """

    tokens: list[str]
    table: pa.Table

    def top(self, head: Head | str, position: int = -1, lens: str = "trained") -> list[tuple[str, float]]:
        """Return `[(token, prob), ...]` of one head at `position` (negative: from the end) under `lens` (for
        "effect": the probability the head adds)."""
        heads = parse_heads(head, param="head")
        if len(heads) != 1:
            raise ApiError(f"head: expected one head, got {len(heads)} ({format_heads(heads)})")
        (layer, h), = heads
        pos = position % len(self.tokens)
        return [(r["token"], r["prob"]) for r in self.table.to_pylist()
                if (r["layer"], r["head"], r["position"], r["lens"]) == (layer, h, pos, lens)]

    def __repr__(self) -> str:
        heads = sorted({(r["layer"], r["head"]) for r in self.table.select(["layer", "head"]).to_pylist()})
        return f"Decoding({len(self.tokens)} tokens, heads {format_heads(heads)}, {self.table.num_rows} rows)"


def text_positions(position: str | int, n: int) -> np.ndarray:
    """Return the selected positions of an `n`-token text: "all", "last" or one index (negative: from the end)."""
    if position == "all":
        return np.arange(n)
    if position == "last":
        return np.array([n - 1])
    if isinstance(position, int) and not isinstance(position, bool) and -n <= position < n:
        return np.array([position % n])
    raise ApiError(f"position: expected 'all', 'last' or an index in [-{n}, {n}), got {position!r}")
