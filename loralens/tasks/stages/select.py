"""The `select` stage: cheap causal scores for every head, and a head set chosen greedily, on the selection split.

Between attribute and intervene. On the selection split of the challenging prompts
(`loralens.tasks.evaluation.splits`), each
prompt followed by its human continuation, teacher-forced:

- `ablation_tox_drop`: per head, the drop of the toxicity proxy (the teacher-forced expected token toxicity of the
  model's next-token distributions along the continuation, `loralens.lens.heads.causal_scores`) when that head alone
  is zero-ablated: one forward pass per head per prompt batch;
- `attribution_patching`: its first-order estimate for every head at once (z . dJ/dz) from one forward and one
  backward pass per batch;
- the greedy selection (`loralens.lens.evaluation.greedy_selection`) over the top `select.candidates` heads of
  `select.method`, within `goal`'s head and perplexity budgets, each step confirmed by sampling;
- with `select.steering.enabled`, head-wise steering (`loralens.tasks.evaluation.steering_selection`): per-head
  directions and sigmas, a per-head probe (`probe_auroc`), and the preregistered head-set and all-heads steering
  conditions (`summary["steering"]`), every trial and the first-order table.

The causal scores and the greedy selection zero-ablate; the steering search measures the edit it preregisters.
The intervene stage evaluates, on the evaluation split this stage never sees, the preregistered steering condition
as its headline (else the greedy set, its `selected: true` head set) against random head sets given the same edit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from prefect import task

from loralens.config import ConfigError, PipelineConfig
from loralens.lens.evaluation.generation import prompt_batches
from loralens.lens.evaluation.greedy_selection import greedy_select, head_budget
from loralens.lens.evaluation.perplexity import perplexity
from loralens.lens.evaluation.scorers import primary_label
from loralens.lens.evaluation.statistics import expected_max_toxicity, relative_change
from loralens.lens.heads import head_scores as A
from loralens.lens.heads.causal_scores import (
    ablation_effects,
    attribution_patching,
    expected_toxicity_proxy,
    teacher_forced_batches,
)
from loralens.lens.heads.edits import ablate
from loralens.lens.heads.head_sets import Head, format_heads
from loralens.lens.runtime.devices import steady_host_matmuls
from loralens.tasks.evaluation.sampling import sample_scored
from loralens.tasks.evaluation.splits import prompt_splits
from loralens.tasks.evaluation.steering_selection import (
    preregistration,
    read_steering_tables,
    stage_steering,
    steering_report,
    trial_rows,
    write_steering,
)
from loralens.tasks.evaluation.wikitext import wikitext
from loralens.tasks.lens_loading import cached_layers
from loralens.tasks.memory import ensure_fits
from loralens.tasks.stage_versions import (
    StageVersion,
    failures_recorded,
    keeps_old_version,
    register,
    register_complete,
    require_complete,
    reset_for_force,
    reuse_complete,
    science_config,
)
from loralens.tasks.workers.worker_process import stage_model, stage_scorer
from loralens.warehouse.artifacts import atomic_write_bytes
from loralens.warehouse.attribution_tables import head_scores_table
from loralens.warehouse.constants import (
    HEAD_SCORES_FILE,
    PROMPT_SPLITS_FILE,
    SELECT_REPORT,
    SELECTION_PATH_FILE,
)
from loralens.warehouse.corpus import Corpus
from loralens.warehouse.db import warehouse_path
from loralens.warehouse.decodings import token_toxicity_scores
from loralens.warehouse.parquet_files import write_parquet_file
from loralens.warehouse.prompt_splits import Splits, splits_table
from loralens.warehouse.selection_tables import selection_path_table, store_selection
from loralens.warehouse.versions import artifact_version

log = logging.getLogger("loralens.select")
STAGE = "select"
CAUSAL_METHODS = ("ablation_tox_drop", "attribution_patching")
RENAMED_METHODS = {"ablation_nll": "ablation_tox_drop"}  # old name -> new name, for a one-line config error


def select_version(cfg: PipelineConfig, attribute_ver: StageVersion) -> StageVersion:
    """Return the select version: its science settings with the goal's budgets and intervene's sampling and
    perplexity settings it uses, the attribute version (hence the vocabulary toxicity and model), and the
    selection split's prompts (texts and continuations)."""
    s = cfg.select
    if s.method in RENAMED_METHODS:
        raise ConfigError(f"config error: select.method: '{s.method}' was renamed '{RENAMED_METHODS[s.method]}'")
    if s.method not in (*CAUSAL_METHODS, *A.METHODS):
        raise ConfigError(f"config error: select.method: unknown method '{s.method}'; methods: "
                          f"{', '.join((*CAUSAL_METHODS, *A.METHODS))}")
    splits = prompt_splits(cfg)
    config = science_config(cfg, STAGE)
    inputs = {"attribute": attribute_ver.version,
              "corpus_prompts": Corpus(list(splits.corpus)).fingerprint(),
              "selection_prompts": Corpus(list(splits.selection)).fingerprint(continuations=True)}
    return StageVersion(STAGE, artifact_version(STAGE, config, inputs), config, inputs, cfg.home)


def _grid(values: dict[Head, np.ndarray], layers: list[int], n_heads: int) -> np.ndarray:
    """Return per-head means as an `[L, H]` array in `layers` order (nan for a head without a value)."""
    return np.array([[float(np.mean(values[(layer, h)])) if (layer, h) in values else np.nan for h in range(n_heads)]
                     for layer in layers])


def _attribute_scores(attribute_ver: StageVersion, method: str, layers: list[int], n_heads: int) -> np.ndarray:
    """Return one attribute method's scores `[L, H]` from its artifact."""
    t = pq.read_table(attribute_ver.artifact.path / HEAD_SCORES_FILE, filters=[("method", "=", method)],
                      columns=["layer", "head", "score"]).to_pydict()
    out = np.full((len(layers), n_heads), np.nan)
    for layer, h, score in zip(t["layer"], t["head"], t["score"], strict=True):
        out[layers.index(layer), h] = score
    return out


def agreement(scores: dict[str, np.ndarray], top: int = 10) -> dict[str, Any]:
    """Return the Spearman rank agreement of every pair of `[L, H]` score arrays (over the heads both score), and
    how well attribution patching predicts the ablation effect (Pearson r, the overlap of the two top-`top` sets,
    and the number of heads compared)."""
    names = list(scores)

    def both(a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = scores[a].ravel(), scores[b].ravel()
        keep = np.isfinite(x) & np.isfinite(y)
        return x[keep], y[keep]

    out: dict[str, Any] = {f"{a}~{b}": _finite(A.spearman(*both(a, b))) for i, a in enumerate(names)
                           for b in names[i + 1:]}
    if {"ablation_tox_drop", "attribution_patching"} <= set(scores):
        x, y = both("attribution_patching", "ablation_tox_drop")
        r = float(np.corrcoef(x, y)[0, 1]) if x.size > 1 and x.std() > 0 and y.std() > 0 else float("nan")
        n = min(top, x.size)
        overlap = len(set(A.best_first(x)[:n]) & set(A.best_first(y)[:n])) / n if n else float("nan")
        out["patching_predicts_ablation"] = {"pearson": _finite(r), f"top{n}_overlap": _finite(overlap),
                                             "heads": int(x.size)}
    return out


def _finite(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


@keeps_old_version()
def run_select_stage(cfg: PipelineConfig, ver: StageVersion, attribute_ver: StageVersion, decode_ver: StageVersion,
                     cache_ver: StageVersion, *, force: bool = False) -> dict[str, Any]:
    """Score every head causally, select a head set greedily, write Parquet + one DuckDB transaction."""
    adir = ver.artifact
    db = warehouse_path(cfg.home)
    manifest = None if force else adir.manifest()
    if manifest is not None:
        return reuse_complete(ver, manifest)
    require_complete(attribute_ver)
    cache_manifest = require_complete(cache_ver)
    ensure_fits(cfg, STAGE)  # before anything is written: a run that cannot fit says so now
    if force:
        reset_for_force(ver)
    adir.prepare()
    register(ver, status="running")
    t0 = time.perf_counter()
    s = cfg.select
    layers = cached_layers(cache_manifest)
    n_heads = cache_manifest["summary"]["n_heads"]
    heads = [(layer, h) for layer in layers for h in range(n_heads)]
    splits = prompt_splits(cfg)
    loaded = stage_model(cfg, host_float32=True)  # float32 for a half-precision model on a CPU
    device = next(loaded.model.parameters()).device
    proxy = expected_toxicity_proxy(torch.from_numpy(token_toxicity_scores(decode_ver.artifact)).to(device))
    sel = splits.selection
    batches = teacher_forced_batches(loaded.tokenizer, [p.text for p in sel], [p.continuation or "" for p in sel],
                                     batch_size=s.batch_prompts, max_prompt_tokens=s.max_prompt_tokens,
                                     max_continuation_tokens=s.max_continuation_tokens)
    seconds: dict[str, float] = {}
    with steady_host_matmuls(loaded.model):
        t = time.perf_counter()
        patched = attribution_patching(loaded.model, loaded.adapter, batches, layers, proxy, dims=loaded.dims)
        seconds["attribution_patching"] = time.perf_counter() - t
        patching = _grid(patched, layers, n_heads)
        exact = heads if s.exact_heads is None else A.heads_best_first(patching, layers)[: s.exact_heads]
        t = time.perf_counter()
        effects = ablation_effects(loaded.model, loaded.adapter, batches, exact, proxy, dims=loaded.dims)
        seconds["ablation_tox_drop"] = time.perf_counter() - t
        scores = {"ablation_tox_drop": _grid(effects, layers, n_heads), "attribution_patching": patching}
        t = time.perf_counter()
        chosen, path, facts = _select(cfg, loaded, scores, attribute_ver, layers, n_heads, batches, proxy, sel)
        seconds["greedy"] = time.perf_counter() - t
        steering, budget = None, head_budget(len(heads), cfg.goal.max_head_share)
        if s.steering.enabled:
            t = time.perf_counter()
            steering = stage_steering(cfg, loaded, decode_ver, layers, batches, proxy, sel, budget)
            seconds["steering"] = time.perf_counter() - t
            scores["probe_auroc"] = steering.probe
    ranks = {m: A.ranks(v) for m, v in scores.items()}
    lens = _attribute_scores(attribute_ver, "lens_contrast", layers, n_heads)
    agree = agreement({**scores, "lens_contrast": lens})

    out = adir.path
    score_rows = head_scores_table(ver.version, layers, scores, ranks)
    score_rows = score_rows.filter(pc.is_finite(score_rows.column("score")))  # ablation_tox_drop: heads scored
    files = [write_parquet_file(out, HEAD_SCORES_FILE, score_rows),
             write_parquet_file(out, SELECTION_PATH_FILE, selection_path_table(ver.version, path)),
             write_parquet_file(out, PROMPT_SPLITS_FILE, splits_table(ver.version, _without_evaluation(splits)))]
    trials = [] if steering is None else trial_rows(steering)
    if steering is not None:
        files += write_steering(out, ver.version, steering)[0]
    top = {m: [format_heads([h]) for h in A.heads_best_first(v, layers)[:10]] for m, v in scores.items()}
    summary = {
        "rows": score_rows.num_rows, "heads": len(heads), "methods": list(scores),
        "selection_prompts": len(sel), "corpus_prompts": len(splits.corpus),
        "exact_heads": len(exact), "exact_heads_by": "all" if s.exact_heads is None else "top attribution_patching",
        "proxy": "expected token toxicity along the teacher-forced human continuation",
        "selected": format_heads(chosen), "n_selected": len(chosen), "path_steps": len(path),
        "agreement": agree, "top_heads": top, "seconds_by_method": seconds, **facts,
        "steering": None if steering is None else preregistration(steering, s.steering, budget),
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_bytes(out / SELECT_REPORT, _report(summary, path, trials).encode())
    summary["report"] = str(out / SELECT_REPORT)
    adir.record_shard(0, files)
    store_rows(db, ver)
    manifest = adir.finalize(config=ver.config, inputs=ver.inputs, summary=summary)
    register_complete(ver, manifest)
    return {"version": ver.version, "path": str(out), "cached": False, **summary}


def _without_evaluation(splits: Splits) -> Splits:
    # The evaluation split is the intervene version's (its rows carry that version): selecting never reads it.
    return Splits(splits.corpus, splits.selection, ())


def _select(cfg, loaded, scores, attribute_ver, layers, n_heads, batches, proxy, sel):
    """Run the greedy selection; return (chosen heads, path rows, facts for the summary)."""
    s, ic = cfg.select, cfg.intervene
    budget = head_budget(len(layers) * n_heads, cfg.goal.max_head_share)
    if s.method in scores:
        ranked = A.heads_best_first(scores[s.method], layers)
    else:
        ranked = A.heads_best_first(_attribute_scores(attribute_ver, s.method, layers, n_heads), layers)
    candidates = ranked[: s.candidates]
    facts: dict[str, Any] = {"budget_heads": budget, "candidates": format_heads(candidates),
                             "candidate_method": s.method}
    if budget == 0 or not candidates:
        log.warning("select: no head set chosen (head budget %d of %d heads, %d candidates)", budget,
                    len(layers) * n_heads, len(candidates))
        return (), [], facts
    text = wikitext(ic.ppl_tokens)

    def ppl(heads) -> float:
        with ablate(loaded.model, heads, "zero", adapter=loaded.adapter, dims=loaded.dims):
            return perplexity(loaded.model, loaded.tokenizer, text, max_tokens=ic.ppl_tokens,
                              window=ic.ppl_window)["ppl"]

    base_ppl = ppl(())
    scorer = stage_scorer(cfg.attribute.scorer, dict(cfg.attribute.scorer_options))
    label = primary_label(scorer)
    texts = [p.text for p in sel]

    def sample(heads) -> np.ndarray:
        out = np.empty((len(texts), s.k))
        with ablate(loaded.model, heads, "zero", adapter=loaded.adapter, dims=loaded.dims):
            for r in prompt_batches(len(texts), ic.batch_prompts):
                out[r.start:r.stop] = sample_scored(loaded, scorer, label, texts, r, s.k, ic)[1].reshape(len(r), s.k)
        return out

    def proxy_drops(current, cands) -> dict[Head, float]:
        eff = ablation_effects(loaded.model, loaded.adapter, batches, cands, proxy, ablated=current,
                               dims=loaded.dims, progress=False)
        return {h: float(np.mean(v)) for h, v in eff.items()}

    baseline = sample(())
    chosen, steps = greedy_select(candidates, budget=budget, max_ppl_rel=cfg.goal.ppl_rel, tries=s.tries,
                                  proxy_drops=proxy_drops, ppl_rel=lambda hs: relative_change(ppl(hs), base_ppl),
                                  sample=lambda hs: baseline if not hs else sample(hs), progress=log.info)
    rows = [st.to_dict() | {"ppl": None if st.ppl_rel is None else base_ppl * (1 + st.ppl_rel)} for st in steps]
    accepted = [r for r in rows if r["accepted"]]
    facts |= {"baseline_emt": expected_max_toxicity(baseline), "baseline_ppl": base_ppl,
              "selected_emt": accepted[-1]["emt"] if accepted else None,
              "selected_ppl_rel": accepted[-1]["ppl_rel"] if accepted else None}
    return chosen, rows, facts


def _report(summary: dict[str, Any], path: list[dict], trials: list[dict]) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    n_cand = len(summary["candidates"].split(",")) if summary["candidates"] else 0
    lines = [f"Selection on {summary['selection_prompts']} prompts of the selection split; proxy: {summary['proxy']}.",
             "", f"Chosen: {summary['selected'] or 'none'} (head budget {summary['budget_heads']}, candidates: top "
             f"{n_cand} of {summary['candidate_method']})",
             "", "| step | try | head | proxy drop | EMT | EMT drop | PPL rel. | result |",
             "|---:|---:|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['step']} | {r['try']} | L{r['layer']}H{r['head']} | {r['proxy_drop']:+.4f} | {f(r['emt'], '.3f')} "
              f"| {f(r['emt_drop'], '+.3f')} | {f(r['ppl_rel'], '+.1%')} | {r['reason']} |" for r in path]
    lines += ["", "Rank agreement (Spearman) and attribution patching vs exact ablation:", "",
              "| pair | value |", "|---|---:|"]
    for k, v in summary["agreement"].items():
        if isinstance(v, dict):
            lines += [f"| {k}: {kk} | {f(vv, 'd' if isinstance(vv, int) else '.3f')} |" for kk, vv in v.items()]
        else:
            lines.append(f"| {k} | {f(v, '.3f')} |")
    return "\n".join(lines + steering_report(summary["steering"], trials)) + "\n"


def store_rows(db: Path, ver: StageVersion) -> None:
    """Load the version's warehouse rows (causal head scores, selection path, prompt splits, steering trials and
    scores) from its folder."""
    out = ver.artifact.path
    store_selection(db, ver.version, pq.read_table(out / HEAD_SCORES_FILE), pq.read_table(out / SELECTION_PATH_FILE),
                    pq.read_table(out / PROMPT_SPLITS_FILE), read_steering_tables(out))


@task(name="select", persist_result=True)  # keyed by its version in flows/common.run_stage_task
def select_task(cfg: PipelineConfig, ver: StageVersion, attribute_ver: StageVersion, decode_ver: StageVersion,
                cache_ver: StageVersion, force: bool = False) -> dict[str, Any]:
    """Prefect task: the select stage, keyed by its artifact version."""
    with failures_recorded(ver):
        return run_select_stage(cfg, ver, attribute_ver, decode_ver, cache_ver, force=force)


__all__ = ["CAUSAL_METHODS", "agreement", "run_select_stage", "select_task", "select_version",
           "store_rows"]
