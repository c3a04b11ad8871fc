"""Flow `intervene_heads`: the intervene stage (needs complete attribute and select versions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loralens.config import PipelineConfig
from loralens.flows.common import (
    pin_dtype,
    resolve_config,
    results_under_home,
    run_stage_task,
    run_workers,
    scale_out,
    split_over_workers,
)
from loralens.tasks.chain import stage_chain
from loralens.tasks.stage_versions import StageVersion, keeping_old_version
from loralens.tasks.stages.intervene import generation_units, intervene_batches_task, intervene_task, intervene_version


def intervene_stage(cfg: PipelineConfig, cache_ver: StageVersion | None = None, force: bool = False,
                    workers: int = 1, units: list[int] | None = None, verify: bool = False) -> dict[str, Any]:
    """Run the intervene task keyed by its version; attach the metrics table and plot to the flow run.

    `workers > 1` (or an open `scale_out` block) maps the (condition, prompt batch) generation units over Dask
    worker processes, then finalizes in this process; `units` generates only those units and returns without
    finalizing (one machine's share).
    """
    chain = stage_chain(cfg, "select", cache_ver)
    cache_ver, attribute_ver = chain["cache"], chain["attribute"]
    ver, conditions = intervene_version(cfg, chain["select"], attribute_ver, cache_ver)
    args = (cfg, ver, conditions, attribute_ver, cache_ver)
    if units is not None:
        with results_under_home(cfg):
            return intervene_batches_task(*args, sorted(units))
    with keeping_old_version(ver):  # one guard over the workers and the finalizing task
        force = split_over_workers(cfg, ver, intervene_batches_task, args,
                                   lambda: generation_units(cfg, conditions, ver), workers, force,
                                   (attribute_ver, chain["select"]))
        summary = run_stage_task(intervene_task, cfg, ver, conditions, attribute_ver, cache_ver, force=force,
                                 verify=verify)
    report = Path(summary["report"]).read_text(encoding="utf-8")
    create_markdown_artifact(key="interventions", markdown=f"{report}\nPlot: `{summary['plot']}`\n",
                             description=f"intervene stage, version {ver.version}")
    return summary


@flow(name="intervene-heads")
def intervene_heads(
    config_path: str | None = None,
    config: dict[str, Any] | None = None,
    force: bool = False,
    workers: int | None = None,
    units: list[int] | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Ablate attributed heads (and random controls), generate, and measure toxicity and perplexity.

    Generation splits like caching: `workers=N` maps its (condition, prompt batch) units over a local Dask cluster
    of N worker processes, `dask_address` over an existing scheduler's workers (both default to the config's
    `run` section); across deployment runs on different machines, give each a disjoint `units` list, then run
    once without `units` to compute the metrics and finalize.
    """
    cfg = resolve_config(config_path, config)
    workers, dask_address = run_workers(cfg, workers, dask_address)
    with scale_out(workers, dask_address, cfg=cfg) as pool:
        cfg = pin_dtype(cfg, pool)  # `auto` as the workers resolve it, before any version
        return intervene_stage(cfg, force=force, workers=workers, units=units)
