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
from loralens.lens.heads.head_sets import format_heads
from loralens.lens.runtime.models import LoadedModel
from loralens.tasks.evaluation.sampling import sample_scored
from loralens.tasks.evaluation.steering import Directions, intervention
from loralens.tasks.evaluation.steering_controls import (
    ALL_HEADS,
    RANDOM_SOURCE,
    headline_rows,
    random_direction,
    random_sets,
)


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
               n_layers: int, n_heads: int, random_seeds: Sequence[int], sources: Sequence[str],
               edits: Sequence[str], all_heads: Steering | None = None
               ) -> tuple[dict[str, tuple[Steering | None, HeadIntervention]], list[str]]:
    """Return ({name: (condition, its edit)}, the random controls' names): the headline, `random_seeds` random head
    sets, the random-direction control, every other (source, edit) at the headline's heads and strength, zero
    ablation of those heads, and (given) the preregistered all-heads condition as `all_heads`."""
    d_hat, sigma = dict(d_hat), dict(sigma)
    out: dict[str, tuple[Steering | None, HeadIntervention]] = {
        "headline": (headline, intervention(headline, d_hat, sigma))}
    randoms = []
    for seed, cond in zip(random_seeds, random_sets(headline, n_layers, n_heads, random_seeds), strict=True):
        out[f"random{seed}"] = (cond, intervention(cond, d_hat, sigma))
        randoms.append(f"random{seed}")
    rand_dir, dirs, sig = random_direction(headline, d_hat, sigma, seed=int(random_seeds[0]) if random_seeds else 0)
    d_hat[RANDOM_SOURCE], sigma[RANDOM_SOURCE] = dirs, sig
    out["random_direction"] = (rand_dir, intervention(rand_dir, d_hat, sigma))
    for source in sources:
        for edit in edits:
            cond = Steering(headline.heads, edit, source, headline.alpha)
            if (source, edit) != (headline.source, headline.edit) and source in d_hat:
                out[f"{edit}:{source}"] = (cond, intervention(cond, d_hat, sigma))
    out["zero"] = (None, HeadIntervention("zero", headline.heads))
    if all_heads is not None:
        out[ALL_HEADS] = (all_heads, intervention(all_heads, d_hat, sigma))
    return out, randoms


def evaluate(loaded: LoadedModel, scorer, label: str, prompts: Sequence[str], ic: InterveneConfig, text: str,
             conds: Mapping[str, tuple[Steering | None, HeadIntervention]], randoms: Sequence[str], *,
             n_boot: int = 1000, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
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
                                                                   for n, p in ppl.items()}, n_boot=n_boot)
    for row in rows:
        row["ppl"] = base_ppl if row["name"] == "baseline" else ppl[row["name"]]
        if row["name"] in conds and "heads" not in row:
            row["heads"] = format_heads(conds[row["name"]][1].heads)
    return rows


__all__ = ["conditions", "evaluate", "ppl_under", "sample_under"]
