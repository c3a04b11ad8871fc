"""Flow `train_lenses`: the train stage (needs a complete cache version)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from loralens.config import PipelineConfig
from loralens.flows.common import resolve_config, results_under_home
from loralens.tasks.cache import plan_cache
from loralens.tasks.plans import StagePlan
from loralens.tasks.train import plan_train, train_task


def train_stage(cfg: PipelineConfig, cache_plan: StagePlan | None = None, force: bool = False) -> dict[str, Any]:
    """Run the train task keyed by its version; a complete version is a Prefect cache hit."""
    cache_plan = cache_plan or plan_cache(cfg)
    plan = plan_train(cfg, cache_plan)
    refresh = force or not plan.artifact.is_complete()
    with results_under_home(cfg):
        state = train_task.with_options(refresh_cache=refresh)(cfg, plan, cache_plan, force, return_state=True)
    summary = dict(state.result())
    summary["cached"] = summary["cached"] or state.name == "Cached"
    rows = [{"key": k, "value": str(v)} for k, v in summary.items()]
    create_table_artifact(key="train-summary", table=rows, description=f"train stage, version {plan.version}")
    return summary


@flow(name="train-lenses")
def train_lenses(
    config_path: str | None = None, config: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Train a Lora Lens for every head of every cached layer under DeepSpeed."""
    return train_stage(resolve_config(config_path, config), force=force)
