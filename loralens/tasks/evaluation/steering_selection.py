"""The select side of head-wise steering, in one function the select stage and `benchmarks/detox_steering.py`
both call: labels, activations, directions, the per-head probe, the preregistered head-set and all-heads
conditions, each on the selection split (and benign WikiText) only.

Shapes: `n` selection prompts, `L` cached layers, `H` heads per layer, `dh` d_head.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from loralens.config import PipelineConfig, SteeringConfig
from loralens.hashing import file_sha256
from loralens.lens.evaluation.probes import probe_auroc
from loralens.lens.evaluation.scorers import primary_label
from loralens.lens.evaluation.steering_search import Steering, Trial
from loralens.lens.heads.causal_scores import ForcedBatch, Proxy
from loralens.lens.heads.directions import ScoredActivations, scored_activations
from loralens.lens.runtime.models import LoadedModel, model_context_length
from loralens.tasks.evaluation.steering import (
    Directions,
    SteeringChoice,
    benign_batches,
    choose_all_heads,
    choose_steering,
    contrast_labels,
    exact_measure,
    head_directions,
    ppl_measure,
    sigmas,
    trial_record,
    unit_directions,
)
from loralens.tasks.evaluation.steering_controls import (
    MatchedControls,
    control_seeds,
    draw_random_sets,
    fluency_matched_sets,
)
from loralens.tasks.evaluation.wikitext import wikitext
from loralens.tasks.stage_versions import StageVersion, require_complete
from loralens.tasks.workers.worker_process import stage_reader, stage_scorer
from loralens.warehouse.artifacts import ShardFile
from loralens.warehouse.constants import STEERING_DIRECTIONS_FILE, STEERING_SCORES_FILE, STEERING_TRIALS_FILE
from loralens.warehouse.corpus import Prompt
from loralens.warehouse.decodings import token_toxicity_scores
from loralens.warehouse.parquet_files import write_parquet_file
from loralens.warehouse.selection_tables import steering_scores_table, steering_trials_table
from loralens.warehouse.steering_directions import write_directions

log = logging.getLogger("loralens.select")
LensLogits = Mapping[int, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class SteeringDirections:
    """Per-head toxic directions from the selection split: the labels used, the sources that could be computed,
    unit directions `{source: {layer: [H, dh]}}`, sigmas `{source: {layer: [H]}}`, and the activations."""

    toxic: np.ndarray  # [n] bool
    cut: str
    sources: list[str]
    d_hat: Directions
    sigma: dict[str, dict[int, torch.Tensor]]
    acts: ScoredActivations
    seconds: dict[str, float]


@dataclass
class SteeringSelection:
    """What the selection split preregisters: directions `{source: {layer: [H, dh]}}` and sigmas `[H]`, the
    head-set choice and its fluency-matched random controls, the all-heads condition, the probe's held-out AUROC
    `[L, H]`, and the labels used."""

    toxic: np.ndarray  # [n] bool
    cut: str
    d_hat: Directions
    sigma: dict[str, dict[int, torch.Tensor]]
    choice: SteeringChoice
    controls: MatchedControls | None
    all_heads: Trial | None
    all_trials: list[Trial]
    probe: np.ndarray  # [L, H], nan where a held-out AUROC is undefined
    sources: list[str]
    seconds: dict[str, float]


def lens_logits_of(reader, layers: Sequence[int]) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    """Return `{layer: x [n, H, d] -> trained-lens logits [n, H, V]}` from a HeadReader's banks (differentiable;
    the logits come back on x's device)."""
    def logits(bank):
        return lambda x: bank.head_logits(x.to(reader.device)).float().to(x.device)

    return {layer: logits(reader.banks[layer]) for layer in layers}


def probe_split(toxic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, test) prompt indices: within each label, in prompt order, alternately train and test
    (deterministic and stratified; the first of each label trains)."""
    test = np.zeros(len(toxic), dtype=bool)
    for group in (np.flatnonzero(toxic), np.flatnonzero(~toxic)):
        test[group[1::2]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def head_probe_auroc(acts: ScoredActivations, toxic: np.ndarray, layers: Sequence[int], n_heads: int) -> np.ndarray:
    """Return each head's held-out probe AUROC `[L, H]` on each prompt's mean z over its scored positions
    (`probe_split`; prompts without a scored position are left out); all nan when either label has fewer than
    two prompts (no held-out AUROC)."""
    has = torch.bincount(acts.row, minlength=acts.n_seq).cpu().numpy() > 0
    keep = np.flatnonzero(has)
    y = np.asarray(toxic, dtype=bool)[keep]
    out = np.full((len(layers), n_heads), np.nan)
    if min(int(y.sum()), int((~y).sum())) < 2:
        return out
    train, test = probe_split(y)
    y_t = torch.from_numpy(y)
    for i, layer in enumerate(layers):
        z = acts.means(layer)[torch.from_numpy(keep)]  # [n, H, dh]
        out[i] = probe_auroc(z[train], y_t[train], z[test], y_t[test])
    return out


def steering_directions(loaded: LoadedModel, plan: SteeringConfig, batches: Sequence[ForcedBatch],
                        token_tox: torch.Tensor, continuation_tox: np.ndarray, layers: Sequence[int],
                        lens_logits: LensLogits | None, *, progress: Callable[[str], None] | None = None
                        ) -> SteeringDirections:
    """Return each head's toxic direction of every source of `plan` (contrast labels from the selection split's
    human continuation scores `[n]`; `token_tox` `[V]`), their sigmas and the activations they came from."""
    say = progress or (lambda _msg: None)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    toxic, cut = contrast_labels(np.asarray(continuation_tox, dtype=np.float64), plan.threshold)
    sources = list(plan.sources)
    if "contrast" in sources and (toxic.all() or not toxic.any()):
        sources.remove("contrast")
        log.warning("steering: every continuation scores the same: no contrast direction")
    if not sources:
        raise ValueError("select.steering.sources: no direction source is left (contrast needs two label groups)")
    say(f"steering: {int(toxic.sum())} of {len(toxic)} continuations toxic ({cut}); activations")
    acts = scored_activations(loaded.model, loaded.adapter, batches, layers, loaded.dims.n_heads)
    seconds["activations"] = time.perf_counter() - t
    t = time.perf_counter()
    say(f"steering: directions from {', '.join(sources)} over {len(layers)} layers")
    d_hat = unit_directions(head_directions(loaded, acts, toxic, token_tox.cpu(), sources, lens_logits))
    sigma = sigmas(acts, d_hat)
    seconds["directions"] = time.perf_counter() - t
    return SteeringDirections(toxic, cut, sources, d_hat, sigma, acts, seconds)


def matched_controls(headline: Steering, plan: SteeringConfig, layers: Sequence[int], n_heads: int,
                     rise: Callable[[Steering], float], *, seed: int, ppl_budget: float,
                     progress: Callable[[str], None] | None = None) -> MatchedControls:
    """Return `plan.random_sets` random head sets of the headline's size within `ppl_budget` under its edit
    (`steering_controls.fluency_matched_sets`), drawn from `control_seeds(seed, size, plan.random_draws)`."""
    candidates = draw_random_sets(headline, layers, n_heads,
                                  control_seeds(seed, len(headline.heads), plan.random_draws))
    controls = fluency_matched_sets(headline, candidates, rise, n=plan.random_sets, ppl_budget=ppl_budget)
    if progress is not None:
        progress(f"steering: {len(controls.kept)} random sets within PPL +{ppl_budget:.0%} of "
                 f"{len(controls.kept) + len(controls.rejected)} drawn")
    if len(controls.kept) < plan.random_sets:
        log.warning("steering: only %d of %d random sets within the PPL budget after %d draws "
                    "(select.steering.random_draws)", len(controls.kept), plan.random_sets, plan.random_draws)
    return controls


def select_steering(loaded: LoadedModel, plan: SteeringConfig, batches: Sequence[ForcedBatch],
                    nll_batches: Sequence[ForcedBatch], proxy: Proxy, token_tox: torch.Tensor,
                    continuation_tox: np.ndarray, layers: Sequence[int], lens_logits: LensLogits | None, *,
                    budget: int, max_ppl_rel: float, text: str, ppl_tokens: int, ppl_window: int, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> SteeringSelection:
    """Choose the steering conditions to preregister from the selection split's teacher-forced `batches` and the
    scores of their human continuations `[n]`; `token_tox` `[V]` (host); `text` is benign WikiText; `seed` draws
    the random controls."""
    say = progress or (lambda _msg: None)
    dirs = steering_directions(loaded, plan, batches, token_tox, continuation_tox, layers, lens_logits,
                               progress=progress)
    d_hat, sigma, seconds = dirs.d_hat, dirs.sigma, dict(dirs.seconds)
    t = time.perf_counter()
    probe = head_probe_auroc(dirs.acts, dirs.toxic, layers, loaded.dims.n_heads)
    seconds["probe"] = time.perf_counter() - t
    run = plan.model_copy(update={"sources": tuple(dirs.sources)})
    say("steering: first-order ranking and exact search")
    rise = ppl_measure(loaded, text, ppl_tokens=ppl_tokens, ppl_window=ppl_window, d_hat=d_hat, sigma=sigma)
    measure = exact_measure(loaded, batches, proxy, rise, d_hat=d_hat, sigma=sigma)
    choice = choose_steering(loaded, run, batches, nll_batches, proxy, d_hat, sigma, budget=budget,
                             max_ppl_rel=max_ppl_rel, measure=measure, progress=progress)
    seconds |= choice.facts["seconds"]
    controls = None
    if choice.chosen is not None and plan.random_sets:
        t = time.perf_counter()
        controls = matched_controls(choice.chosen.condition, plan, layers, loaded.dims.n_heads, rise, seed=seed,
                                    ppl_budget=max_ppl_rel, progress=progress)
        seconds["controls"] = time.perf_counter() - t
    all_heads, all_trials = None, []
    if plan.all_heads:
        t = time.perf_counter()
        say("steering: the all-heads condition")
        every = [(layer, h) for layer in layers for h in range(loaded.dims.n_heads)]
        all_heads, all_trials = choose_all_heads(run, every, measure, progress=progress)
        seconds["all_heads"] = time.perf_counter() - t
    return SteeringSelection(dirs.toxic, dirs.cut, d_hat, sigma, choice, controls, all_heads, all_trials, probe,
                             dirs.sources, seconds)


def stage_steering(cfg: PipelineConfig, loaded: LoadedModel, decode_ver: StageVersion, layers: Sequence[int],
                   batches: Sequence[ForcedBatch], proxy: Proxy, prompts: Sequence[Prompt], budget: int
                   ) -> SteeringSelection:
    """Run `select_steering` as the select stage does: continuations scored by the stage's scorer, the decode
    version's token toxicity and its train version's lenses, WikiText at intervene's perplexity settings."""
    plan, ic = cfg.select.steering, cfg.intervene
    scorer = stage_scorer(cfg.attribute.scorer, dict(cfg.attribute.scorer_options))
    log.info("steering: scoring %d human continuations", len(prompts))
    cont = np.asarray(scorer.score([p.continuation or "" for p in prompts])[primary_label(scorer)], np.float64)
    lens = None
    if "lens" in plan.sources:
        train_ver = StageVersion("train", decode_ver.inputs["train"], {}, {}, cfg.home)
        require_complete(train_ver)
        lens = lens_logits_of(stage_reader(cfg, train_ver, list(layers))[1], layers)
    text = wikitext(ic.ppl_tokens)
    context = model_context_length(loaded.model.config) - 2  # an empty prompt's BOS and one spare position
    return select_steering(loaded, plan, batches, benign_batches(loaded.tokenizer, text, max_tokens=min(128, context)),
                           proxy,
                           torch.from_numpy(token_toxicity_scores(decode_ver.artifact)), cont, layers, lens,
                           budget=budget, max_ppl_rel=cfg.goal.ppl_rel, text=text, ppl_tokens=ic.ppl_tokens,
                           ppl_window=ic.ppl_window, seed=ic.seed, progress=log.info)


def write_steering(out: Path, version: str, sel: SteeringSelection) -> tuple[list[ShardFile], dict[str, pa.Table]]:
    """Write the directions, trials and first-order scores into the version folder `out`; return their
    ShardFiles and the warehouse tables (`steering_trials`, `steering_scores`)."""
    def numpy(by_source):
        return {s: {la: v.detach().cpu().numpy() for la, v in by_layer.items()} for s, by_layer in by_source.items()}

    path = write_directions(out / STEERING_DIRECTIONS_FILE, numpy(sel.d_hat), numpy(sel.sigma))
    tables = {"steering_trials": steering_trials_table(version, trial_rows(sel)),
              "steering_scores": steering_scores_table(version, sel.choice.first_order)}
    files = [ShardFile(path=STEERING_DIRECTIONS_FILE, rows=0, bytes=path.stat().st_size, sha256=file_sha256(path)),
             write_parquet_file(out, STEERING_TRIALS_FILE, tables["steering_trials"]),
             write_parquet_file(out, STEERING_SCORES_FILE, tables["steering_scores"])]
    return files, tables


def read_steering_tables(out: Path) -> dict[str, pa.Table]:
    """Return the warehouse tables a version folder's steering files hold (none when it did not steer)."""
    if not (out / STEERING_TRIALS_FILE).exists():
        return {}
    return {"steering_trials": pq.read_table(out / STEERING_TRIALS_FILE),
            "steering_scores": pq.read_table(out / STEERING_SCORES_FILE)}


def trial_rows(sel: SteeringSelection) -> list[dict[str, Any]]:
    """Return one record per measured condition (`trial_record`) with its kind ('head_set' | 'all_heads') and
    whether it is the one preregistered."""
    rows = [trial_record(t) | {"kind": "head_set", "chosen": t == sel.choice.chosen} for t in sel.choice.trials]
    return rows + [trial_record(t, all_heads=True) | {"kind": "all_heads", "chosen": t == sel.all_heads}
                   for t in sel.all_trials]


def preregistration(sel: SteeringSelection, plan: SteeringConfig, budget: int) -> dict[str, Any]:
    """Return the summary's `steering` block: the preregistered headline and all-heads records (None when no
    condition is within budget), the labels, the search's settings and its seconds."""
    return {"headline": None if sel.choice.chosen is None else trial_record(sel.choice.chosen),
            "controls": None if sel.controls is None else sel.controls.to_dict(),
            "all_heads": None if sel.all_heads is None else trial_record(sel.all_heads, all_heads=True),
            "labels": sel.cut, "toxic_continuations": int(sel.toxic.sum()), "selection_prompts": len(sel.toxic),
            "sources": list(sel.sources), "edits": list(plan.edits), "head_budget": budget,
            "seconds": dict(sel.seconds)}


def steering_report(block: Mapping[str, Any] | None, trials: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return the select report's steering section (Markdown lines): headline, all-heads condition, labels and
    every trial, largest proxy drop first."""
    if block is None:
        return ["", "## Steering", "", "Off (`select.steering.enabled: false`)."]

    def cond(rec: Mapping[str, Any] | None) -> str:
        if rec is None:
            return "none (no condition lowered the proxy within the perplexity budget)"
        return (f"heads {rec['heads']}, {rec['edit']} along `{rec['source']}`, alpha {rec['alpha']:g}: proxy drop "
                f"{rec['proxy_drop']:+.4f}, PPL {rec['ppl_rel']:+.1%}")

    def controls(rec: Mapping[str, Any] | None) -> str:
        if not rec:
            return "none"
        worst = max((r["ppl_rel"] for r in rec["rejected"]), default=None)
        return (f"{len(rec['random_sets'])} random head sets within PPL +{rec['ppl_budget']:.0%} under the same "
                f"edit, of {rec['draws']} drawn" + ("" if worst is None else f" (rejected up to PPL {worst:+.1%})"))

    lines = ["", "## Steering", "",
             f"Labels: {block['toxic_continuations']} of {block['selection_prompts']} human continuations toxic "
             f"({block['labels']}); sources {', '.join(block['sources'])}; edits {', '.join(block['edits'])}; head "
             f"budget {block['head_budget']}.", "",
             f"- Preregistered headline: {cond(block['headline'])}",
             f"- Preregistered controls: {controls(block.get('controls'))}",
             f"- Preregistered all-heads condition: {cond(block['all_heads'])}", "",
             "| kind | heads | edit | source | alpha | proxy drop | PPL rel. | within budget | chosen |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in sorted(trials, key=lambda r: -r["proxy_drop"]):
        lines.append(f"| {r['kind']} | {r['heads']} | {r['edit']} | {r['source']} | {r['alpha']:g} "
                     f"| {r['proxy_drop']:+.4f} | {r['ppl_rel']:+.1%} | {'yes' if r['within_budget'] else 'no'} "
                     f"| {'**yes**' if r['chosen'] else ''} |")
    return lines


__all__ = ["LensLogits", "SteeringDirections", "SteeringSelection", "head_probe_auroc", "lens_logits_of",
           "matched_controls", "preregistration", "probe_split", "read_steering_tables", "select_steering",
           "stage_steering", "steering_directions", "steering_report", "trial_rows", "write_steering"]
