"""Flow `train_lenses`: the train stage (needs a complete cache version)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from loralens.config import PipelineConfig
from loralens.flows.common import resolve_config, run_stage_task
from loralens.tasks.cache import plan_cache
from loralens.tasks.plans import StagePlan
from loralens.tasks.train import plan_train, train_task


def train_stage(cfg: PipelineConfig, cache_plan: StagePlan | None = None, force: bool = False) -> dict[str, Any]:
    """Run the train task keyed by its version (the cache version is one of its inputs)."""
    cache_plan = cache_plan or plan_cache(cfg)
    return run_stage_task(train_task, cfg, plan_train(cfg, cache_plan), cache_plan, force=force)


@flow(name="train-lenses")
def train_lenses(
    config_path: str | None = None, config: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Train a Lora Lens for every head of every cached layer under DeepSpeed."""
    return train_stage(resolve_config(config_path, config), force=force)
