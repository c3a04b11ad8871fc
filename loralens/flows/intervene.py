"""Flow `intervene_heads`: the intervene stage (needs a complete attribute version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from prefect.artifacts import create_markdown_artifact

from loralens.config import PipelineConfig
from loralens.flows.common import resolve_config, results_under_home, run_stage_task
from loralens.tasks.attribute import plan_attribute
from loralens.tasks.cache import plan_cache
from loralens.tasks.decode import plan_decode
from loralens.tasks.intervene import generation_units, intervene_batches_task, intervene_task, plan_intervene
from loralens.tasks.plans import StagePlan, reset_for_force
from loralens.tasks.train import plan_train


def intervene_stage(cfg: PipelineConfig, cache_plan: StagePlan | None = None, force: bool = False,
                    workers: int = 1, units: list[int] | None = None) -> dict[str, Any]:
    """Run the intervene task keyed by its version; attach the metrics table and plot to the flow run.

    `workers > 1` maps the (condition, prompt batch) generation units over that many concurrent tasks, then
    finalizes; `units` generates only those units and returns without finalizing (one machine's share).
    """
    cache_plan = cache_plan or plan_cache(cfg)
    attribute_plan = plan_attribute(cfg, plan_decode(cfg, plan_train(cfg, cache_plan)))
    plan, conditions = plan_intervene(cfg, attribute_plan, cache_plan)
    args = (cfg, plan, conditions, attribute_plan, cache_plan)
    if units is not None:
        with results_under_home(cfg):
            return intervene_batches_task(*args, sorted(units))
    if workers > 1 and force:
        reset_for_force(plan)  # once, before any worker writes; the finalizing task then sees an empty version
        force = False
    if workers > 1 and not plan.artifact.is_complete():
        every = generation_units(cfg, conditions)
        groups = [every[i::workers] for i in range(min(workers, len(every)))]
        with results_under_home(cfg):
            for future in intervene_batches_task.map(*(unmapped(a) for a in args), groups):
                future.result()
    summary = run_stage_task(intervene_task, cfg, plan, conditions, attribute_plan, cache_plan, force=force)
    report = Path(summary["report"]).read_text(encoding="utf-8")
    create_markdown_artifact(key="interventions", markdown=f"{report}\nPlot: `{summary['plot']}`\n",
                             description=f"intervene stage, version {plan.version}")
    return summary


@flow(name="intervene-heads")
def intervene_heads(
    config_path: str | None = None,
    config: dict[str, Any] | None = None,
    force: bool = False,
    workers: int = 1,
    units: list[int] | None = None,
) -> dict[str, Any]:
    """Ablate attributed heads (and random controls), generate, and measure toxicity and perplexity.

    Generation splits like caching: `workers=N` maps its (condition, prompt batch) units over N concurrent
    tasks; across deployment runs on different machines, give each a disjoint `units` list, then run once
    without `units` to compute the metrics and finalize.
    """
    return intervene_stage(resolve_config(config_path, config), force=force, workers=workers, units=units)
