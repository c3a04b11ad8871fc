"""Flow `attribute_heads`: the attribute stage (needs a complete decode version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loralens.config import PipelineConfig
from loralens.flows.common import resolve_config, run_stage_task
from loralens.tasks.attribute import attribute_task, plan_attribute
from loralens.tasks.cache import plan_cache
from loralens.tasks.decode import plan_decode
from loralens.tasks.plans import StagePlan
from loralens.tasks.train import plan_train


def attribute_stage(cfg: PipelineConfig, cache_plan: StagePlan | None = None, force: bool = False,
                    verify: bool = False) -> dict[str, Any]:
    """Run the attribute task keyed by its version; attach the top-heads table and heatmaps to the flow run."""
    cache_plan = cache_plan or plan_cache(cfg)
    train_plan = plan_train(cfg, cache_plan)
    decode_plan = plan_decode(cfg, train_plan)
    plan = plan_attribute(cfg, decode_plan)
    summary = run_stage_task(attribute_task, cfg, plan, decode_plan, train_plan, cache_plan, force=force,
                             verify=verify)
    report = Path(summary["report"]).read_text(encoding="utf-8")
    heatmaps = "\n".join(f"- {m}: `{p}`" for m, p in summary["heatmaps"].items())
    create_markdown_artifact(key="top-toxic-heads", markdown=f"{report}\nHeatmaps (layers x heads):\n{heatmaps}\n",
                             description=f"attribute stage, version {plan.version}")
    return summary


@flow(name="attribute-heads")
def attribute_heads(
    config_path: str | None = None, config: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Score every head's contribution to toxicity by several methods and store the scores in DuckDB."""
    return attribute_stage(resolve_config(config_path, config), force=force)
