"""Flow `cache_activations`: the cache stage on its own."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from loralens.config import PipelineConfig
from loralens.flows.common import resolve_config, results_under_home
from loralens.tasks.cache import cache_task, plan_cache


def cache_stage(cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """Run the cache task keyed by its version; a complete version is a Prefect cache hit."""
    plan = plan_cache(cfg)
    refresh = force or not plan.artifact.is_complete()  # a deleted artifact must not be a cache hit
    with results_under_home(cfg):
        state = cache_task.with_options(refresh_cache=refresh)(cfg, plan, force, return_state=True)
    summary = dict(state.result())
    summary["cached"] = summary["cached"] or state.name == "Cached"
    rows = [{"key": k, "value": str(v)} for k, v in summary.items() if not isinstance(v, dict)]
    create_table_artifact(key="cache-summary", table=rows, description=f"cache stage, version {plan.version}")
    return summary


@flow(name="cache-activations")
def cache_activations(
    config_path: str | None = None, config: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Cache per-head attention inputs and lens targets of a frozen model over a prompt corpus."""
    return cache_stage(resolve_config(config_path, config), force=force)
