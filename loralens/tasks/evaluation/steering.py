"""Head-wise steering on the selection split: per-head toxic directions from three sources, their strengths, the
fluency-aware first-order ranking, and the exact search for the one condition to preregister.

Everything here reads the selection split (prompt + human continuation, teacher-forced) and benign WikiText only;
the evaluation split is the intervene stage's. The lens-level math lives in `loralens.lens.heads.directions`,
`loralens.lens.heads.steering_scores` and `loralens.lens.evaluation.steering_search`.

Labels for the `contrast` source: each selection prompt's human continuation scored by the stage's toxicity scorer
(the same scorer the evaluation uses), toxic at >= `threshold`; when one group would be empty the split is at the
median score instead (recorded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loralens.config import SteeringConfig
from loralens.lens.evaluation.perplexity import perplexity
from loralens.lens.evaluation.statistics import relative_change
from loralens.lens.evaluation.steering_search import Steering, Trial, ranked_heads, search
from loralens.lens.heads.causal_scores import (
    ForcedBatch,
    Proxy,
    forced_objective,
    proxy_values,
    teacher_forced_batches,
)
from loralens.lens.heads.directions import (
    ScoredActivations,
    contrast_direction,
    lens_direction,
    lens_direction_chunk,
    projection_sigma,
    unembed_direction,
    unit,
)
from loralens.lens.heads.edits import HeadIntervention, intervene
from loralens.lens.heads.head_scores import toxic_direction
from loralens.lens.heads.head_sets import Head, parse_head_list
from loralens.lens.heads.steering_scores import first_order_edit_effects, fluency_aware_score, nll_objective
from loralens.lens.lenses.lens_set import lens_inputs
from loralens.lens.runtime.adapters import folded_unembedding, out_proj_weight
from loralens.lens.runtime.models import LoadedModel

ALL = "all"  # the heads of an all-heads condition, as recorded

# source -> layer -> [H, dh]
Directions = dict[str, dict[int, torch.Tensor]]


@dataclass
class SteeringChoice:
    """The search's outcome: the condition to preregister (or None), every trial, the first-order table."""

    chosen: Trial | None
    trials: list[Trial]
    first_order: list[dict[str, Any]]
    facts: dict[str, Any] = field(default_factory=dict)


def contrast_labels(scores: np.ndarray, threshold: float) -> tuple[np.ndarray, str]:
    """Return (toxic mask `[n]`, how it was cut): at `threshold`, or at the median when a group would be empty."""
    toxic = scores >= threshold
    if toxic.all() or not toxic.any():
        toxic = scores > np.median(scores)
        return toxic, "median"
    return toxic, f">= {threshold:g}"


def _toxic_residual_direction(loaded: LoadedModel, token_tox: torch.Tensor) -> torch.Tensor:
    """Return the unembedding's toxic direction `[d]` (`toxic_direction` of the folded unembedding)."""
    w_fold, _ = folded_unembedding(loaded.adapter, loaded.model)
    return toxic_direction(w_fold.float(), token_tox.to(w_fold.device).float())


def head_directions(loaded: LoadedModel, acts: ScoredActivations, toxic: np.ndarray, token_tox: torch.Tensor,
                    sources: Sequence[str], lens_logits: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None,
                    chunk: int | None = None) -> Directions:
    """Return `{source: {layer: d [H, dh]}}` for every cached layer (unnormalized; see `lens/heads/directions`).

    `lens_logits[layer]` maps lens inputs `[n, H, d]` to that layer's trained-lens logits (needed for `lens`),
    `chunk` positions at a time (default `lens_direction_chunk`: bounded `[chunk, H, V]` blocks).
    """
    mask = torch.from_numpy(np.asarray(toxic, dtype=bool))
    u = _toxic_residual_direction(loaded, token_tox)  # [d]; the [V, d] fold is freed before the lens blocks
    tox = token_tox.float()
    out: Directions = {s: {} for s in sources}
    chunk = chunk or lens_direction_chunk(loaded.dims.n_heads, int(tox.shape[0]))
    for layer, z in acts.z.items():
        w_o = out_proj_weight(loaded.adapter, loaded.model, layer, loaded.dims).detach().float().cpu()
        if "contrast" in out:
            means = acts.means(layer)
            out["contrast"][layer] = contrast_direction(means[mask], means[~mask])
        if "unembed" in out:
            out["unembed"][layer] = unembed_direction(w_o, u.cpu())
        if "lens" in out:
            if lens_logits is None:
                raise ValueError("sources: 'lens' needs the trained lenses")
            total = torch.zeros(z.shape[1], z.shape[2], device=z.device)
            for start in range(0, z.shape[0], chunk):
                zc, sc = z[start:start + chunk], acts.scale[start:start + chunk]
                x = lens_inputs(zc.flatten(-2), sc, w_o)
                total += lens_direction(lens_logits[layer], x, w_o, sc, tox) * zc.shape[0]
            out["lens"][layer] = total / max(z.shape[0], 1)
    return out


def unit_directions(directions: Directions) -> Directions:
    """Return every direction normalized (per head)."""
    return {s: {layer: unit(d) for layer, d in by_layer.items()} for s, by_layer in directions.items()}


def sigmas(acts: ScoredActivations, d_hat: Directions) -> dict[str, dict[int, torch.Tensor]]:
    """Return `{source: {layer: sigma [H]}}`: the spread of z_h along d_hat_h over the scored positions."""
    return {s: {layer: projection_sigma(acts.z[layer], d) for layer, d in by_layer.items()}
            for s, by_layer in d_hat.items()}


def benign_batches(tokenizer, text: str, *, pieces: int = 4, chars: int = 1000, max_tokens: int = 128
                   ) -> list[ForcedBatch]:
    """Return the benign NLL batches of the first-order ranking: `pieces` consecutive `chars`-character pieces of
    `text` (WikiText), each teacher-forced from an empty prompt, at most `max_tokens` tokens each, in one batch."""
    texts = [text[i * chars:(i + 1) * chars] for i in range(pieces)]
    return teacher_forced_batches(tokenizer, [""] * pieces, texts, batch_size=pieces,
                                  max_continuation_tokens=max_tokens)


def first_order_table(loaded: LoadedModel, tox_batches: Sequence[ForcedBatch], nll_batches: Sequence[ForcedBatch],
                      proxy: Proxy, d_hat: Directions, sigma: Mapping[str, Mapping[int, torch.Tensor]],
                      bars: bool = False) -> tuple[dict[tuple[str, str], list[Head]], list[dict[str, Any]]]:
    """Return (heads ranked by the fluency-aware score per (edit, source), one row per head, source and edit).

    Per head: the first-order change of the toxicity proxy and of WikiText NLL at strength 1 (steer: one sigma;
    reverse: factor 1), their means over sequences, and the score (toxicity drop per unit NLL rise).
    """
    rankings: dict[tuple[str, str], list[Head]] = {}
    rows: list[dict[str, Any]] = []
    for source, by_layer in d_hat.items():
        tox = first_order_edit_effects(loaded.model, loaded.adapter, tox_batches, by_layer, forced_objective(proxy),
                                       dims=loaded.dims, progress=bars)
        nll = first_order_edit_effects(loaded.model, loaded.adapter, nll_batches, by_layer, nll_objective(),
                                       dims=loaded.dims, progress=bars)
        for edit in tox:
            heads = list(tox[edit])
            scale = np.array([float(sigma[source][la][h]) if edit == "steer" else 1.0 for la, h in heads])
            t = np.array([float(np.mean(tox[edit][h])) for h in heads]) * scale
            n = np.array([float(np.mean(nll[edit][h])) for h in heads]) * scale
            score = fluency_aware_score(t, n)
            rankings[(edit, source)] = ranked_heads(dict(zip(heads, score, strict=True)))
            rows += [{"source": source, "edit": edit, "layer": la, "head": h, "tox_change": float(ti),
                      "nll_change": float(ni), "score": float(si)}
                     for (la, h), ti, ni, si in zip(heads, t, n, score, strict=True)]
    return rankings, rows


def intervention(cond: Steering, d_hat: Directions, sigma: Mapping[str, Mapping[int, torch.Tensor]]
                 ) -> HeadIntervention:
    """Return the head edit of a steering condition (its heads' own directions and sigmas)."""
    dirs = {h: d_hat[cond.source][h[0]][h[1]] for h in cond.heads}
    sig = {h: float(sigma[cond.source][h[0]][h[1]]) for h in cond.heads}
    return HeadIntervention(cond.edit, cond.heads, factor=cond.alpha, z_directions=dirs, sigmas=sig)


def ppl_measure(loaded: LoadedModel, text: str, *, ppl_tokens: int, ppl_window: int, d_hat: Directions,
                sigma: Mapping[str, Mapping[int, torch.Tensor]]) -> Callable[[Steering], float]:
    """Return rise(condition) -> relative perplexity rise on `text` under the condition's edit (the plain
    model's perplexity measured once, now)."""
    def ppl() -> float:
        return perplexity(loaded.model, loaded.tokenizer, text, max_tokens=ppl_tokens, window=ppl_window)["ppl"]

    base_ppl = ppl()

    def rise(cond: Steering) -> float:
        with intervene(loaded.model, loaded.adapter, intervention(cond, d_hat, sigma), loaded.dims):
            return relative_change(ppl(), base_ppl)

    return rise


def exact_measure(loaded: LoadedModel, batches: Sequence[ForcedBatch], proxy: Proxy,
                  rise: Callable[[Steering], float], *, d_hat: Directions,
                  sigma: Mapping[str, Mapping[int, torch.Tensor]]) -> Callable[[Steering], tuple[float, float]]:
    """Return measure(condition) -> (mean proxy drop on the selection split, `rise(condition)`: its relative
    perplexity rise, `ppl_measure`)."""
    base_proxy = float(np.mean(proxy_values(loaded.model, batches, proxy)))

    def measure(cond: Steering) -> tuple[float, float]:
        with intervene(loaded.model, loaded.adapter, intervention(cond, d_hat, sigma), loaded.dims):
            drop = base_proxy - float(np.mean(proxy_values(loaded.model, batches, proxy)))
        return drop, rise(cond)

    return measure


def choose_steering(loaded: LoadedModel, plan: SteeringConfig, tox_batches: Sequence[ForcedBatch],
                    nll_batches: Sequence[ForcedBatch], proxy: Proxy, d_hat: Directions,
                    sigma: Mapping[str, Mapping[int, torch.Tensor]], *, budget: int, max_ppl_rel: float,
                    measure: Callable[[Steering], tuple[float, float]],
                    progress: Callable[[str], None] | None = None) -> SteeringChoice:
    """Rank heads to first order, then search sizes x strengths exactly; return the condition to preregister
    (its facts: the head budget, sizes and alphas searched, and the seconds of each part)."""
    d_hat = {s: d_hat[s] for s in plan.sources if s in d_hat}
    t = time.perf_counter()
    rankings, rows = first_order_table(loaded, tox_batches, nll_batches, proxy, d_hat, sigma,
                                       bars=progress is not None)
    first_order = time.perf_counter() - t
    rankings = {k: v for k, v in rankings.items() if k[0] in plan.edits}
    sizes = [n for n in plan.sizes if n <= budget]
    t = time.perf_counter()
    chosen, trials = search(rankings, sizes=sizes, alphas=plan.alphas, max_ppl_rel=max_ppl_rel, measure=measure,
                            progress=progress)
    seconds = {"first_order": first_order, "search": time.perf_counter() - t}
    return SteeringChoice(chosen, trials, rows, {"head_budget": budget, "sizes": sizes,
                                                 "alphas": list(plan.alphas), "seconds": seconds})


def trial_record(trial: Trial, *, all_heads: bool = False) -> dict[str, Any]:
    """Return a trial as the select stage records it (summary, trials table); an all-heads trial's heads are
    written "all" (`condition_from_record` expands them again)."""
    rec = trial.to_dict()
    if all_heads:
        c = trial.condition
        rec |= {"heads": ALL, "name": f"{c.edit}:{c.source}:a{c.alpha:g}:{ALL}"}
    return rec


def condition_from_record(rec: Mapping[str, Any], every_head: Sequence[Head]) -> Steering:
    """Return the condition a record names (heads "all": every head of `every_head`, in its order)."""
    heads = tuple(every_head) if rec["heads"] == ALL else tuple(parse_head_list(rec["heads"]))
    return Steering(heads, str(rec["edit"]), str(rec["source"]), float(rec["alpha"]))


def choose_all_heads(plan: SteeringConfig, heads: Sequence[Head], measure: Callable[[Steering], tuple[float, float]],
                     progress: Callable[[str], None] | None = None) -> tuple[Trial | None, list[Trial]]:
    """Return (the all-heads condition to preregister or None, every trial): each (source, edit) of `plan` at
    every head in `heads`, over `plan.all_heads_alphas`, measured on the selection split under
    `plan.all_heads_ppl_rel`."""
    everyone = tuple(heads)
    rankings = {(edit, source): everyone for source in plan.sources for edit in plan.edits}
    return search(rankings, sizes=[len(everyone)], alphas=plan.all_heads_alphas, max_ppl_rel=plan.all_heads_ppl_rel,
                  measure=measure, progress=progress)


__all__ = ["ALL", "Directions", "SteeringChoice", "benign_batches", "choose_all_heads", "choose_steering",
           "condition_from_record", "contrast_labels", "trial_record",
           "exact_measure", "first_order_table", "head_directions", "intervention", "ppl_measure", "sigmas",
           "unit_directions"]
