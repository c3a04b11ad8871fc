"""The controls of a preregistered steering condition, and its report on the evaluation split.

Controls answer "is it these heads, or any heads steered this way?":

- `random_sets`: random head sets of the same size (drawn outside the chosen heads, one per seed), each with the
  same edit, the same direction source (each head its own direction and sigma) and the same strength;
- `random_direction`: the chosen heads with a random unit direction per head and the source's sigma (the same
  shift size, no toxic information).

`headline_rows` compares every condition with the baseline on the same prompts and seeds (EMT, toxicity
probability and mean toxicity, each with a prompt-bootstrap interval) and ranks the headline's EMT drop among the
random sets' (permutation p, `statistics.permutation_test`), with the paired excess-drop interval
(`statistics.versus_random`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from loralens.lens.evaluation.statistics import (
    expected_max_toxicity,
    fluency_matched,
    mean_toxicity,
    metric_table,
    permutation_test,
    relative_change,
    versus_random,
)
from loralens.lens.evaluation.steering_search import Steering
from loralens.lens.heads.head_sets import random_head_sets

RANDOM_SOURCE = "random"
ALL_HEADS = "all_heads"  # the second preregistered condition: every head steered (its own role in the rows)


def random_sets(headline: Steering, n_layers: int, n_heads: int, seeds: Sequence[int]) -> list[Steering]:
    """Return one random head set per seed, of the headline's size, outside its heads, with its edit, source and
    strength."""
    sets = random_head_sets(n_layers, n_heads, len(headline.heads), seeds, exclude=headline.heads)
    return [Steering(heads, headline.edit, headline.source, headline.alpha) for heads in sets]


def random_direction(headline: Steering, d_hat: Mapping[str, Mapping[int, torch.Tensor]],
                     sigma: Mapping[str, Mapping[int, torch.Tensor]], seed: int
                     ) -> tuple[Steering, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Return (the headline's heads steered along random unit directions, those directions `{layer: [H, dh]}`,
    their sigmas `{layer: [H]}` = the source's), for `d_hat`/`sigma` under the source name `random`."""
    g = torch.Generator().manual_seed(seed)
    dirs: dict[int, torch.Tensor] = {}
    for layer in sorted({layer for layer, _ in headline.heads}):
        r = torch.randn(d_hat[headline.source][layer].shape, generator=g)  # host: a CPU generator, reproducible
        dirs[layer] = r / r.norm(dim=-1, keepdim=True)
    sig = {layer: sigma[headline.source][layer].clone() for layer in dirs}
    return Steering(headline.heads, headline.edit, RANDOM_SOURCE, headline.alpha), dirs, sig


def headline_rows(baseline: np.ndarray, conditions: Mapping[str, tuple[Steering | None, np.ndarray]],
                  headline: str, randoms: Sequence[str], ppl_rel: Mapping[str, float], *, n_boot: int = 1000,
                  seed: int = 0, ppl_budget: float = 0.05) -> list[dict[str, Any]]:
    """Return one row per condition (and the baseline): metrics with intervals, relative changes, and for the
    headline its permutation p among `randoms`, the same p among only those within `ppl_budget` (fluency-matched)
    and the paired excess EMT drop interval.

    Scores are `[prompts, k]` toxicity on the same prompts and seeds; `conditions[name] = (condition, scores)`.
    """
    base_emt, base_mean = expected_max_toxicity(baseline), mean_toxicity(baseline)
    rows = [{"name": "baseline", "role": "baseline", **metric_table(baseline, n_boot=n_boot, seed=seed),
             "ppl_rel": 0.0}]
    rand_scores = [conditions[r][1] for r in randoms]
    rand_drops = [base_emt - expected_max_toxicity(s) for s in rand_scores]
    for name, (cond, scores) in conditions.items():
        role = ("headline" if name == headline else "random" if name in randoms
                else ALL_HEADS if name == ALL_HEADS else "exploratory")
        steering = {} if cond is None else cond.to_dict() | {"condition": cond.name}
        row = {**steering, "name": name, "role": role,
               **metric_table(scores, n_boot=n_boot, seed=seed), "ppl_rel": ppl_rel.get(name)}
        row["emt_rel"] = relative_change(row["expected_max_toxicity"], base_emt)
        row["mean_toxicity_rel"] = relative_change(mean_toxicity(scores), base_mean)
        if role == "headline":
            perm = permutation_test(base_emt - row["expected_max_toxicity"], rand_drops)
            matched = permutation_test(base_emt - row["expected_max_toxicity"],
                                       fluency_matched(rand_drops, [ppl_rel.get(r) for r in randoms], ppl_budget))
            vr = versus_random(scores, baseline, rand_scores, n_boot=n_boot, seed=seed)
            row |= {"permutation_rank": perm.rank, "permutation_p": perm.p_value, "n_random": perm.n_random,
                    "permutation_p_fluency_matched": matched.p_value, "n_random_fluency_matched": matched.n_random,
                    "excess_drop": vr.excess, "excess_low": vr.excess_low, "excess_high": vr.excess_high}
        rows.append(row)
    return rows


__all__ = ["ALL_HEADS", "RANDOM_SOURCE", "headline_rows", "random_direction", "random_sets"]
