"""The controls of a preregistered steering condition, and its report on the evaluation split.

Controls answer "is it these heads, or any heads steered this way?":

- random head sets of the same size (`draw_random_sets`: outside the chosen heads, one per seed), each with the
  same edit, the same direction source (each head its own direction and sigma) and the same strength, **matched on
  fluency by construction** (`fluency_matched_sets`): drawn in seed order, each set's perplexity rise on benign
  WikiText measured under the edit, and only sets within the headline's perplexity budget kept, until there are
  enough. A set that breaks the model writes nothing toxic; ranking the headline among such sets would compare it
  with generic damage, not with other heads steered as gently. The select stage draws them, before the
  evaluation split is read, and preregisters them with the headline;
- `random_direction`: the chosen heads with a random unit direction per head and the source's sigma (the same
  shift size, no toxic information).

`headline_rows` compares every condition with the baseline on the same prompts and seeds (EMT, toxicity
probability and mean toxicity, each with a prompt-bootstrap interval) and ranks the headline's EMT drop among the
random sets' (permutation p, `statistics.permutation_test`), with the paired excess-drop interval
(`statistics.versus_random`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loralens.lens.evaluation.generation import hash_seed
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
from loralens.lens.heads.head_sets import Head, format_heads, random_head_sets

RANDOM_SOURCE = "random"
ALL_HEADS = "all_heads"  # the second preregistered condition: every head steered (its own role in the rows)


def require_in_layers(heads: Iterable[Head], layers: Sequence[int]) -> list[int]:
    """Return `layers` as ints; ValueError (one line) when a head of `heads` lies outside them."""
    layers = [int(la) for la in layers]
    outside = sorted({la for la, _ in heads if la not in layers})
    if outside:
        raise ValueError(f"headline: heads in layers {outside} are outside the layers {layers}")
    return layers


def control_seeds(seed: int, size: int, draws: int) -> list[int]:
    """Return the seeds of the first `draws` random sets of `size` heads (`hash_seed(seed, size, i)`)."""
    return [hash_seed(seed, size, i) for i in range(draws)]


def draw_random_sets(headline: Steering, layers: Sequence[int], n_heads: int, seeds: Sequence[int]
                     ) -> list[tuple[Head, ...]]:
    """Return one random set of the headline's size per seed, over `layers` x `n_heads` (real layer indices),
    outside the headline's heads."""
    layers = require_in_layers(headline.heads, layers)
    drawn = random_head_sets(len(layers), n_heads, len(headline.heads), seeds,
                             exclude=[(layers.index(la), h) for la, h in headline.heads])
    return [tuple(sorted((layers[li], h) for li, h in heads)) for heads in drawn]


@dataclass(frozen=True)
class MatchedControls:
    """Random head sets screened on fluency: `kept` (within `ppl_budget`, in draw order) and `rejected`, each
    (heads, relative perplexity rise under the headline's edit)."""

    kept: list[tuple[tuple[Head, ...], float]]
    rejected: list[tuple[tuple[Head, ...], float]]
    ppl_budget: float

    @property
    def heads(self) -> list[tuple[Head, ...]]:
        return [h for h, _ in self.kept]

    def to_dict(self) -> dict[str, Any]:
        """Return the preregistration's record (heads as `L0H1,...` strings)."""
        def rec(pairs):
            return [{"heads": format_heads(h), "ppl_rel": float(p)} for h, p in pairs]

        return {"random_sets": rec(self.kept), "rejected": rec(self.rejected),
                "draws": len(self.kept) + len(self.rejected), "ppl_budget": self.ppl_budget}


def fluency_matched_sets(headline: Steering, candidates: Iterable[tuple[Head, ...]],
                         rise: Callable[[Steering], float], *, n: int, ppl_budget: float) -> MatchedControls:
    """Return the first `n` candidate sets whose perplexity rise under the headline's edit, source and strength
    (`rise`) is within `ppl_budget` (a nan or infinite rise is outside), and the ones rejected on the way; fewer
    than `n` when the candidates run out."""
    kept: list[tuple[tuple[Head, ...], float]] = []
    rejected: list[tuple[tuple[Head, ...], float]] = []
    for heads in candidates:
        if len(kept) >= n:
            break
        p = float(rise(Steering(tuple(heads), headline.edit, headline.source, headline.alpha)))
        (kept if p <= ppl_budget else rejected).append((tuple(heads), p))
    return MatchedControls(kept, rejected, ppl_budget)


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


__all__ = ["ALL_HEADS", "RANDOM_SOURCE", "MatchedControls", "control_seeds", "draw_random_sets",
           "fluency_matched_sets", "headline_rows", "random_direction", "require_in_layers"]
