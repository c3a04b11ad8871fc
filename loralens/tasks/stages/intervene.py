"""The `intervene` stage: edit head sets, sample continuations, score toxicity and fluency against controls.

Conditions (`conditions.py`, the steering ones `steering_conditions.py`) are evaluated on the evaluation split
(`splits.py`); each is sampled per prompt batch (`sampling.py`) with its own edit, measured
(`intervene_metrics.py`) and checked against the goal and its random controls. The headline is the condition the
select stage preregistered (`steering_verdict.py`, `goal_policy.py`); every other condition is exploratory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from loralens.config import PipelineConfig
from loralens.lens.evaluation.generation import prompt_batches
from loralens.lens.evaluation.perplexity import perplexity
from loralens.lens.evaluation.scorers import primary_label
from loralens.lens.heads.edits import ablate, intervene
from loralens.lens.runtime.devices import steady_host_matmuls
from loralens.tasks.evaluation.conditions import Condition, build_conditions, total_heads
from loralens.tasks.evaluation.intervene_metrics import (
    ablation_edit,
    baseline_of,
    condition_row,
    sampled_ablation_scores,
)
from loralens.tasks.evaluation.intervene_summary import stage_summary
from loralens.tasks.evaluation.intervention_inputs import head_means, toxic_direction_of
from loralens.tasks.evaluation.sampling import (
    batch_seeds,
    record_unit_batch_prompts,
    sample_scored,
    unit_batch_prompts,
)
from loralens.tasks.evaluation.splits import prompt_splits
from loralens.tasks.evaluation.steering_conditions import STEERING_GROUPS, intervention_of, load_directions
from loralens.tasks.evaluation.wikitext import wikitext
from loralens.tasks.lens_loading import cached_layers
from loralens.tasks.memory import ensure_fits
from loralens.tasks.report import intervention_markdown, toxicity_ppl_plot
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
from loralens.warehouse.artifacts import atomic_write_bytes, atomic_write_with
from loralens.warehouse.constants import (
    HEAD_SCORES_FILE,
    INTERVENTION_PLOT,
    INTERVENTION_REPORT,
    INTERVENTIONS_FILE,
    PROMPT_SPLITS_FILE,
    STEERING_DIRECTIONS_FILE,
)
from loralens.warehouse.corpus import Corpus
from loralens.warehouse.db import warehouse_path
from loralens.warehouse.intervention_tables import (
    batch_index,
    interventions_table,
    read_condition_scores,
    read_ppl,
    store_interventions,
    write_generation_batch,
    write_ppl,
)
from loralens.warehouse.json_values import json_safe
from loralens.warehouse.prompt_splits import Splits, splits_table
from loralens.warehouse.versions import artifact_version

log = logging.getLogger("loralens.intervene")
STAGE = "intervene"


def intervene_version(cfg: PipelineConfig, select_ver: StageVersion, attribute_ver: StageVersion,
                      cache_ver: StageVersion) -> tuple[StageVersion, list[Condition]]:
    """Return the stage version and its conditions (head sets resolved now, so the version names the heads)."""
    ic = cfg.intervene
    cache_manifest = require_complete(cache_ver)
    cache, layers = cache_manifest["summary"], cached_layers(cache_manifest)
    prompts = evaluation_prompts(cfg)
    conds = build_conditions(ic, (attribute_ver, select_ver), layers, cache["n_heads"], len(prompts.prompts))
    config = science_config(cfg, STAGE) | {"conditions": [c.to_dict() for c in conds]}
    inputs = {"attribute": attribute_ver.version, "select": select_ver.version, "prompts": prompts.fingerprint()}
    return StageVersion(STAGE, artifact_version(STAGE, config, inputs), config, inputs, cfg.home), conds


def evaluation_prompts(cfg: PipelineConfig) -> Corpus:
    """Return the evaluation split (`loralens.tasks.evaluation.splits`): challenging prompts neither the
    attribution nor the
    selection ever saw, the first `intervene.max_prompts` of them."""
    return Corpus(list(prompt_splits(cfg).evaluation))


def _work(conds: list[Condition], batch_prompts: int) -> list[tuple[int, int, range]]:
    """Return every (condition, batch, prompt range) the stage generates, in order."""
    return [(ci, bi, r) for ci, c in enumerate(conds)
            for bi, r in enumerate(prompt_batches(c.n_prompts, batch_prompts))]


def generation_units(cfg: PipelineConfig, conds: list[Condition], ver: StageVersion | None = None) -> list[int]:
    """Return the shard index of every (condition, prompt batch): the units generation is split and resumed by.

    With `ver`, a partial version's units are the ones it was started with (`unit_batch_prompts`).
    """
    size = cfg.intervene.batch_prompts if ver is None else unit_batch_prompts(ver.artifact, cfg.intervene.batch_prompts)
    return [batch_index(ci, bi) for ci, bi, _ in _work(conds, size)]


@keeps_old_version(worker_arg="only_units")
def run_intervene_stage(cfg: PipelineConfig, ver: StageVersion, conds: list[Condition], attribute_ver: StageVersion,
                        cache_ver: StageVersion, *, force: bool = False,
                        only_units: list[int] | None = None) -> dict[str, Any]:
    """Generate and score every (condition, prompt batch) not yet done, then metrics into DuckDB; return a summary.

    `only_units` (indices from `generation_units`) generates just those batches, plus the perplexity of each
    condition whose first batch is among them, and returns without finalizing: one worker's share of a split run.
    """
    adir = ver.artifact
    db = warehouse_path(cfg.home)
    forced = force and only_units is None
    manifest = None if forced else adir.manifest()
    worker = only_units is not None  # one share of a split run: Parquet only, the finalizing run registers
    if manifest is not None:
        return reuse_complete(ver, manifest, worker=worker)
    require_complete(attribute_ver)
    ensure_fits(cfg, STAGE)  # before anything is written: a run that cannot fit says so now
    if forced:
        reset_for_force(ver)  # only once the input is there; the old version is kept aside until done
    adir.prepare(clean_tmp=not worker)  # workers share the folder with others still writing
    if not worker:
        register(ver, status="running")
    t0 = time.perf_counter()
    record_unit_batch_prompts(adir, cfg.intervene.batch_prompts)
    work = _work(conds, unit_batch_prompts(adir, cfg.intervene.batch_prompts))
    chosen = set(only_units) if only_units is not None else None
    t_setup = _generate(cfg, ver, conds, attribute_ver, work, chosen)
    t_done = time.perf_counter()
    if chosen is not None:
        left = sum(adir.shard_files(batch_index(ci, bi)) is None for ci, bi, _ in work)
        return {"version": ver.version, "path": str(adir.path), "cached": False, "partial": True,
                "units_done": len(chosen), "units_left": left, "n_units": len(work)}

    ic = cfg.intervene
    scores = {ci: read_condition_scores(adir, [batch_index(ci, bi) for c2, bi, _ in work if c2 == ci],
                                        c.n_prompts, c.k) for ci, c in enumerate(conds)}
    base = baseline_of(conds)
    ppl = {ci: (read_ppl(adir, ci) or {}).get("ppl") for ci in range(len(conds))}
    rows = [condition_row(c, scores[ci], scores[base[ci]], ppl[ci], ppl[0], ic.kind, ic) for ci, c in enumerate(conds)]
    ablation = sampled_ablation_scores(ver.version, conds, scores)
    cache_manifest = require_complete(cache_ver)
    n_total = total_heads(cached_layers(cache_manifest), cache_manifest["summary"]["n_heads"])
    out = adir.path
    table = interventions_table(ver.version, rows)
    atomic_write_with(out / INTERVENTIONS_FILE, lambda tmp: pq.write_table(table, tmp))
    if ablation is not None:
        atomic_write_with(out / HEAD_SCORES_FILE, lambda tmp: pq.write_table(ablation["table"], tmp))
    atomic_write_with(out / PROMPT_SPLITS_FILE, lambda tmp: pq.write_table(
        splits_table(ver.version, Splits((), (), tuple(evaluation_prompts(cfg).prompts))), tmp))
    select_manifest = require_complete(_select_version(cfg, ver))
    summary = stage_summary(cfg, conds, rows, scores, n_total, select_manifest, ablation,
                            {"setup": t_setup, "generate": t_done - t0 - t_setup, "total": time.perf_counter() - t0})
    summary["generations"] = int(sum(len(r) * conds[ci].k for ci, _, r in work))
    toxicity_ppl_plot(rows, out / INTERVENTION_PLOT)
    atomic_write_bytes(out / INTERVENTION_REPORT, intervention_markdown(rows, summary).encode())
    summary |= {"report": str(out / INTERVENTION_REPORT), "plot": str(out / INTERVENTION_PLOT)}
    store_rows(db, ver)
    manifest = adir.finalize(config=ver.config, inputs=ver.inputs, summary=summary)
    register_complete(ver, manifest)
    return {"version": ver.version, "path": str(out), "cached": False, **json_safe(summary)}


def _generate(cfg: PipelineConfig, ver: StageVersion, conds: list[Condition], attribute_ver: StageVersion,
              work: list[tuple[int, int, range]], chosen: set[int] | None) -> float:
    """Sample, score and record every batch of `work` not yet recorded (only `chosen` ones if given), and PPLs.

    Returns the seconds spent loading the model, scorer and intervention inputs.
    """
    ic = cfg.intervene
    t0 = time.perf_counter()
    adir = ver.artifact

    def wanted(ci: int, bi: int) -> bool:
        return chosen is None or batch_index(ci, bi) in chosen

    def needs_ppl(ci: int) -> bool:
        return conds[ci].group in PPL_GROUPS and wanted(ci, 0) and read_ppl(adir, ci) is None

    todo = [(ci, bi, r) for ci, bi, r in work if wanted(ci, bi) and adir.shard_files(batch_index(ci, bi)) is None]
    busy = {ci for ci, _, _ in todo} | {ci for ci in range(len(conds)) if needs_ppl(ci)}
    if not busy:
        return 0.0  # everything recorded: no model or scorer to load
    # Once per Dask worker process for all the units it runs.
    loaded = stage_model(cfg, host_float32=True)  # float32 for a half-precision model on a CPU
    scorer = stage_scorer(cfg.attribute.scorer, dict(cfg.attribute.scorer_options))
    label = primary_label(scorer)
    prompts = [p.text for p in evaluation_prompts(cfg).prompts]
    text = wikitext(ic.ppl_tokens if ic.kind != "mean" else max(ic.ppl_tokens, ic.mean_tokens))
    layers = sorted({layer for c in conds if c.edit is None for layer, _ in c.heads})
    extra: dict[str, Any] = {}
    if ic.kind == "mean":
        extra["means"] = head_means(loaded, layers, ver, text, ic.mean_tokens)
    if ic.kind == "project":
        extra["direction"] = toxic_direction_of(attribute_ver, loaded)
    if any(conds[ci].edit is not None and conds[ci].edit.source is not None for ci in busy):
        # Once per process: every steering condition's own heads' directions and sigmas, from the select version.
        extra["steering"] = load_directions(_select_version(cfg, ver).artifact.path / STEERING_DIRECTIONS_FILE)
    t_setup = time.perf_counter() - t0
    mine = [(ci, bi, r) for ci, bi, r in work if wanted(ci, bi)]
    with (tqdm(total=sum(len(r) * conds[ci].k for ci, _, r in mine), desc="intervene", unit="sample") as bar,
          steady_host_matmuls(loaded.model)):
        for ci, cond in enumerate(conds):
            if ci not in busy:
                bar.update(sum(len(r) * cond.k for c2, _, r in mine if c2 == ci))
                continue
            with _edited(loaded, cond, ic, extra):
                for bi, r in [(bi, r) for c2, bi, r in mine if c2 == ci]:
                    if adir.shard_files(batch_index(ci, bi)) is None:
                        flat, tox = sample_scored(loaded, scorer, label, prompts, r, cond.k, ic)
                        rows = {"condition": [cond.name] * len(flat),
                                "prompt_idx": [i for i in r for _ in range(cond.k)],
                                "sample": [j for _ in r for j in range(cond.k)],
                                "seed": batch_seeds(prompts, r, cond.k, ic.seed),
                                "prompt": [prompts[i] for i in r for _ in range(cond.k)], "text": flat,
                                "toxicity": tox.tolist()}
                        write_generation_batch(adir, batch_index(ci, bi), rows)
                    bar.update(len(r) * cond.k)
                if needs_ppl(ci):
                    write_ppl(adir, ci, perplexity(loaded.model, loaded.tokenizer, text, max_tokens=ic.ppl_tokens,
                                                   window=ic.ppl_window))
    return t_setup


def _select_version(cfg: PipelineConfig, ver: StageVersion) -> StageVersion:
    """Return the select version the intervene version `ver` read (its preregistration and steering directions)."""
    return StageVersion("select", ver.inputs["select"], {}, {}, cfg.home)


def _edited(loaded, cond: Condition, ic, extra: dict[str, Any]):
    """Return the context applying a condition's edit: its own (steering groups), else `intervene.kind`."""
    if cond.edit is not None:
        iv = intervention_of(cond.heads, cond.edit, *extra.get("steering", (None, None)))
        return intervene(loaded.model, loaded.adapter, [iv], loaded.dims)
    return ablate(loaded.model, cond.heads, ablation_edit(cond, ic.kind), factor=ic.factor, means=extra.get("means"),
                  direction=extra.get("direction"), adapter=loaded.adapter, dims=loaded.dims)


# The conditions whose perplexity is measured (the single-head ablations are a score, not a candidate edit).
PPL_GROUPS = ("baseline", "attributed", "selected", "random", *STEERING_GROUPS)


def store_rows(db: Path, ver: StageVersion) -> None:
    """Load the version's warehouse rows (interventions, ablation scores, generations, splits) from its folder."""
    adir = ver.artifact
    table = pq.read_table(adir.path / INTERVENTIONS_FILE)
    abl = adir.path / HEAD_SCORES_FILE
    store_interventions(db, ver.version, table, pq.read_table(abl) if abl.exists() else None, adir,
                        pq.read_table(adir.path / PROMPT_SPLITS_FILE))


@task(name="intervene", persist_result=True)  # keyed by flows.common.run_stage_task (version + home)
def intervene_task(cfg: PipelineConfig, ver: StageVersion, conds: list[Condition], attribute_ver: StageVersion,
                   cache_ver: StageVersion, force: bool = False) -> dict[str, Any]:
    """Prefect task: the intervene stage, keyed by its artifact version."""
    with failures_recorded(ver):
        return run_intervene_stage(cfg, ver, conds, attribute_ver, cache_ver, force=force)


@task(name="intervene-batches", cache_policy=NO_CACHE, persist_result=False)
def intervene_batches_task(cfg: PipelineConfig, ver: StageVersion, conds: list[Condition], attribute_ver: StageVersion,
                           cache_ver: StageVersion, units: list[int]) -> dict[str, Any]:
    """Prefect task: generate only `units` of the version (one worker's share of a split run; never cached)."""
    return run_intervene_stage(cfg, ver, conds, attribute_ver, cache_ver, only_units=units)


__all__ = ["evaluation_prompts", "generation_units", "intervene_batches_task", "intervene_task", "intervene_version",
           "run_intervene_stage", "store_rows"]
