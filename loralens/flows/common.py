"""Shared flow helpers: config resolution and per-home result storage for cached tasks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Task
from prefect.artifacts import create_table_artifact
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from loralens.config import PipelineConfig, load_config, parse_config
from loralens.tasks.plans import StagePlan, reverify_on_reuse
from loralens.warehouse.db import is_registered_complete, warehouse_path


def resolve_config(config_path: str | None = None, config: dict[str, Any] | None = None) -> PipelineConfig:
    """Return the validated config from a file, with `config` mapping keys laid over it."""
    base = load_config(config_path)
    if not config:
        return base
    merged = base.model_dump(mode="json")
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return parse_config(merged)


@contextmanager
def results_under_home(cfg: PipelineConfig) -> Iterator[None]:
    """Persist Prefect task results under the project home while the block runs."""
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(cfg.home / "prefect-results")}):
        yield


def run_stage_task(
    stage_task: Task, cfg: PipelineConfig, plan: StagePlan, *args: Any, force: bool = False
) -> dict[str, Any]:
    """Run a stage's task keyed by `plan.version`, publish its summary, and return it (cached flag set).

    A complete version is a Prefect cache hit; a version whose artifact folder is gone (or `force`)
    refreshes the cache, so a deleted artifact is never a stale hit. So does one the warehouse does not register
    as complete (a run killed between its manifest and its rows): the task then only registers it.
    """
    reopened = reverify_on_reuse(plan)  # a file corrupted after completion is never a stale hit
    refresh = (force or reopened or not plan.artifact.is_complete()
               or not is_registered_complete(warehouse_path(cfg.home), plan.version))
    # Prefect keeps results per user (~/.prefect/storage), not per home: the key names the home too, so a hit
    # never returns a summary whose paths point into another (maybe deleted) home with the same version.
    home = hashlib.sha256(str(cfg.home.resolve()).encode()).hexdigest()[:12]
    key = f"loralens-{plan.stage}-{plan.version}-{home}"
    with results_under_home(cfg):
        state = stage_task.with_options(refresh_cache=refresh, cache_key_fn=lambda *_: key)(
            cfg, plan, *args, force, return_state=True)
    summary = dict(state.result())
    summary["cached"] = summary["cached"] or state.name == "Cached"
    rows = [{"key": k, "value": str(v)} for k, v in summary.items() if not isinstance(v, dict)]
    create_table_artifact(key=f"{plan.stage}-summary", table=rows,
                          description=f"{plan.stage} stage, version {plan.version}")
    return summary
