"""Evaluating a preregistered steering condition on prompts the selection never saw: the headline, its controls
and the exploratory conditions, each sampled on the same prompts with the same seeds, plus perplexity.

The headline is fixed before this runs (`steering.choose_steering` on the selection split); whatever the
evaluation says, it stays the headline. Exploratory rows (other sources and edits at the same heads, zero ablation
of the same heads) are reported as such, never as the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from loralens.config import InterveneConfig
from loralens.lens.evaluation.generation import prompt_batches
from loralens.lens.evaluation.perplexity import perplexity
from loralens.lens.evaluation.statistics import relative_change
from loralens.lens.evaluation.steering_search import Steering
from loralens.lens.heads.edits import HeadIntervention, intervene
from loralens.lens.heads.head_sets import Head, format_heads
from loralens.lens.runtime.models import LoadedModel
from loralens.tasks.evaluation.sampling import sample_scored
from loralens.tasks.evaluation.steering import Directions
from loralens.tasks.evaluation.steering_conditions import (
    STEERING_EXPLORATORY,
    STEERING_RANDOM,
    intervention_of,
    steering_conditions,
)
from loralens.tasks.evaluation.steering_controls import headline_rows


def sample_under(loaded: LoadedModel, scorer, label: str, prompts: Sequence[str], k: int, ic: InterveneConfig,
                 iv: HeadIntervention | None) -> np.ndarray:
    """Return toxicity `[prompts, k]` of continuations sampled with `iv` applied (None: the plain model)."""
    out = np.empty((len(prompts), k))
    with intervene(loaded.model, loaded.adapter, [] if iv is None else [iv], loaded.dims):
        for r in prompt_batches(len(prompts), ic.batch_prompts):
            out[r.start:r.stop] = sample_scored(loaded, scorer, label, list(prompts), r, k, ic)[1].reshape(len(r), k)
    return out


def ppl_under(loaded: LoadedModel, text: str, ic: InterveneConfig, iv: HeadIntervention | None) -> float:
    """Return the perplexity of `text` with `iv` applied."""
    with intervene(loaded.model, loaded.adapter, [] if iv is None else [iv], loaded.dims):
        return perplexity(loaded.model, loaded.tokenizer, text, max_tokens=ic.ppl_tokens, window=ic.ppl_window)["ppl"]


def conditions(headline: Steering, d_hat: Directions, sigma: Mapping[str, Mapping[int, torch.Tensor]], *,
               layers: Sequence[int], random_sets: Sequence[Sequence[Head]], direction_seed: int,
               sources: Sequence[str], edits: Sequence[str], all_heads: Steering | None = None,
               exploratory: bool = True) -> tuple[dict[str, tuple[Steering | None, HeadIntervention]], list[str]]:
    """Return ({key: (condition, its edit)}, the random controls' keys) of `steering_conditions.steering_conditions`
    (the headline, the given random head sets, random directions, the exploratory conditions unless
    `exploratory` is False, and `all_heads` when given), each edit built from `d_hat` / `sigma`."""
    conds = steering_conditions(headline, layers=layers, random_sets=random_sets, direction_seed=direction_seed,
                                sources=sources, edits=edits, all_heads=all_heads)
    if not exploratory:
        conds = [c for c in conds if c.group != STEERING_EXPLORATORY]
    out = {c.key: (c.steering, intervention_of(c.heads, c.spec, d_hat, sigma)) for c in conds}
    return out, [c.key for c in conds if c.group == STEERING_RANDOM]


def evaluate(loaded: LoadedModel, scorer, label: str, prompts: Sequence[str], ic: InterveneConfig, text: str,
             conds: Mapping[str, tuple[Steering | None, HeadIntervention]], randoms: Sequence[str], *,
             n_boot: int = 1000, ppl_budget: float = 0.05, progress: Callable[[str], None] | None = None
             ) -> list[dict[str, Any]]:
    """Sample the baseline and every condition on `prompts` (same seeds), measure perplexity on `text`, and
    return `steering_controls.headline_rows` with each row's `ppl` and `heads`."""
    baseline = sample_under(loaded, scorer, label, prompts, ic.k, ic, None)
    base_ppl = ppl_under(loaded, text, ic, None)
    scored: dict[str, tuple[Steering | None, np.ndarray]] = {}
    ppl: dict[str, float] = {}
    for name, (cond, iv) in conds.items():
        scored[name] = (cond, sample_under(loaded, scorer, label, prompts, ic.k, ic, iv))
        ppl[name] = ppl_under(loaded, text, ic, iv)
        if progress is not None:
            progress(f"{name}: sampled {len(prompts)} x {ic.k}, PPL {ppl[name]:.2f}")
    rows = headline_rows(baseline, scored, "headline", randoms, {n: relative_change(p, base_ppl)
                                                                   for n, p in ppl.items()}, n_boot=n_boot,
                         ppl_budget=ppl_budget)
    for row in rows:
        row["ppl"] = base_ppl if row["name"] == "baseline" else ppl[row["name"]]
        if row["name"] in conds and "heads" not in row:
            row["heads"] = format_heads(conds[row["name"]][1].heads)
    return rows


__all__ = ["conditions", "evaluate", "ppl_under", "sample_under"]
