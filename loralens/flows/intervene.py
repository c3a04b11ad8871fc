"""Flow `intervene_heads`: the intervene stage (needs a complete attribute version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loralens.config import PipelineConfig
from loralens.flows.common import resolve_config, run_stage_task
from loralens.tasks.attribute import plan_attribute
from loralens.tasks.cache import plan_cache
from loralens.tasks.decode import plan_decode
from loralens.tasks.intervene import intervene_task, plan_intervene
from loralens.tasks.plans import StagePlan
from loralens.tasks.train import plan_train


def intervene_stage(cfg: PipelineConfig, cache_plan: StagePlan | None = None, force: bool = False) -> dict[str, Any]:
    """Run the intervene task keyed by its version; attach the metrics table and plot to the flow run."""
    cache_plan = cache_plan or plan_cache(cfg)
    attribute_plan = plan_attribute(cfg, plan_decode(cfg, plan_train(cfg, cache_plan)))
    plan, conditions = plan_intervene(cfg, attribute_plan, cache_plan)
    summary = run_stage_task(intervene_task, cfg, plan, conditions, attribute_plan, cache_plan, force=force)
    report = Path(summary["report"]).read_text(encoding="utf-8")
    create_markdown_artifact(key="interventions", markdown=f"{report}\nPlot: `{summary['plot']}`\n",
                             description=f"intervene stage, version {plan.version}")
    return summary


@flow(name="intervene-heads")
def intervene_heads(
    config_path: str | None = None, config: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Ablate attributed heads (and random controls), generate, and measure toxicity and perplexity."""
    return intervene_stage(resolve_config(config_path, config), force=force)
