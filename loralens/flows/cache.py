"""Flow `cache_activations`: the cache stage on its own."""

from __future__ import annotations

from typing import Any

from prefect import flow

from loralens.config import PipelineConfig
from loralens.flows.common import resolve_config, run_stage_task
from loralens.tasks.cache import cache_task, plan_cache
from loralens.tasks.plans import StagePlan


def cache_stage(cfg: PipelineConfig, plan: StagePlan | None = None, force: bool = False) -> dict[str, Any]:
    """Run the cache task keyed by its version (planned here unless the caller already planned it)."""
    return run_stage_task(cache_task, cfg, plan or plan_cache(cfg), force=force)


@flow(name="cache-activations")
def cache_activations(
    config_path: str | None = None, config: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Cache per-head attention inputs and lens targets of a frozen model over a prompt corpus."""
    return cache_stage(resolve_config(config_path, config), force=force)
