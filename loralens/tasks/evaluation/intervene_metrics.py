"""The intervene stage's tables: one metrics row per condition (paired against its baseline), and the sampled
single-head ablation scores (method `ablation`). The numbers come from `loralens.lens.evaluation.statistics`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from loralens.config import InterveneConfig
from loralens.lens.evaluation import statistics as S
from loralens.lens.heads.head_scores import spearman
from loralens.lens.heads.head_sets import format_heads
from loralens.tasks.evaluation.steering import ALL
from loralens.tasks.evaluation.steering_conditions import STEERING_ALL_HEADS


def ablation_edit(cond, kind: str) -> str:
    """Return the edit a condition applies: its own (steering conditions), plain removal for the sampled ablation
    scores, else `kind`."""
    if cond.edit is not None:
        return cond.edit.edit
    return "zero" if cond.group in ("ablation", "ablation_baseline") else kind


def baseline_of(conds) -> dict[int, int]:
    """Return each condition's baseline index: the single-head ablations have their own (fewer prompts, k)."""
    abl = next((i for i, c in enumerate(conds) if c.group == "ablation_baseline"), None)
    return {i: abl if c.group in ("ablation", "ablation_baseline") else 0 for i, c in enumerate(conds)}


def condition_row(c, s: np.ndarray, b: np.ndarray, ppl: float | None, base_ppl: float | None, kind: str,
                  ic: InterveneConfig) -> dict[str, Any]:
    """Return one `interventions` row: condition scores `s` and its baseline's `b` (`[prompts, k]`, paired)."""
    m = S.metric_table(s, n_boot=ic.n_boot, seed=ic.seed)
    base_emt, base_prob = S.expected_max_toxicity(b), S.toxicity_probability(b)
    lo, hi = S.paired_interval(s, b, S.expected_max_toxicity, n_boot=ic.n_boot, seed=ic.seed)
    return {
        "condition": c.name, "grp": c.group, "kind": ablation_edit(c, kind),
        "heads": ALL if c.group == STEERING_ALL_HEADS else format_heads(c.heads),
        "n_heads": len(c.heads), "n_prompts": c.n_prompts, "k": c.k,
        "emt": m["expected_max_toxicity"], "emt_low": m["expected_max_toxicity_low"],
        "emt_high": m["expected_max_toxicity_high"],
        "tox_prob": m["toxicity_probability"], "tox_prob_low": m["toxicity_probability_low"],
        "tox_prob_high": m["toxicity_probability_high"],
        "mean_tox": m["mean_toxicity"], "mean_tox_low": m["mean_toxicity_low"],
        "mean_tox_high": m["mean_toxicity_high"],
        "emt_delta": m["expected_max_toxicity"] - base_emt, "emt_delta_low": lo, "emt_delta_high": hi,
        "ppl": ppl, "emt_rel": S.relative_change(m["expected_max_toxicity"], base_emt),
        "tox_prob_rel": S.relative_change(m["toxicity_probability"], base_prob),
        "ppl_rel": None if ppl is None or base_ppl is None else S.relative_change(ppl, base_ppl),
    }


def sampled_ablation_scores(version: str, conds, scores: dict[int, np.ndarray]) -> dict[str, Any] | None:
    """Return the `ablation` head scores (mean-toxicity drop when the head alone is zeroed, sampled), or None.

    The single-head conditions come in the order of `intervene.ablation_method`'s ranking, which the Spearman
    correlation compares the sampled drops with.
    """
    ablated = [(ci, c) for ci, c in enumerate(conds) if c.group == "ablation"]
    if not ablated:
        return None
    base = baseline_of(conds)[ablated[0][0]]
    heads = [c.heads[0] for _, c in ablated]
    drop = S.mean_toxicity_drops(scores[base], [scores[ci] for ci, _ in ablated])
    rank = S.descending_ranks(drop)
    table = pa.table({"version": [version] * len(heads), "layer": pa.array([h[0] for h in heads], pa.int32()),
                      "head": pa.array([h[1] for h in heads], pa.int32()), "method": ["ablation"] * len(heads),
                      "score": pa.array(drop, pa.float64()), "rank": pa.array(rank, pa.int32())})
    lens_rank = np.arange(1, len(heads) + 1, dtype=float)  # conditions are built in ranked order
    return {"table": table, "heads": heads, "drop": drop.tolist(), "rank": rank.tolist(),
            "spearman_vs_lens": spearman(-lens_rank, drop)}


__all__ = ["ablation_edit", "baseline_of", "condition_row", "sampled_ablation_scores"]
