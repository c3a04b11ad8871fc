"""Shared flow helpers: config resolution and per-home result storage for cached tasks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from loralens.config import PipelineConfig, load_config, parse_config
from loralens.tasks.stage_versions import (
    StageVersion,
    keeping_old_version,
    require_complete,
    reset_for_force,
    reverify_on_reuse,
)
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


def split_over_workers(cfg: PipelineConfig, ver: StageVersion, worker_task: Task, args: tuple,
                       units: Callable[[], list[int]], workers: int, force: bool,
                       upstream: tuple[StageVersion, ...] = ()) -> bool:
    """Map a stage's work units round-robin over `workers` tasks (`worker_task(*args, units)`) unless the version
    is complete; return the `force` left for the finalizing task.

    With `force`, the version is reset once here, before any worker writes but after the `upstream` versions are
    checked complete (the finalizing task then sees an empty version, so it gets force=False). Call it and the
    finalizing `run_stage_task` inside one `keeping_old_version(ver)`, which keeps the old complete version
    until the new one is. `units` is called only when there is work to split.
    """
    if workers <= 1:
        return force
    if force:
        for up in upstream:
            require_complete(up)
        reset_for_force(ver)
    if not ver.artifact.is_complete():
        every = units()
        groups = [every[i::workers] for i in range(min(workers, len(every)))]
        with results_under_home(cfg):
            for future in worker_task.map(*(unmapped(a) for a in args), groups):
                future.result()
    return False


def run_stage_task(
    stage_task: Task, cfg: PipelineConfig, ver: StageVersion, *args: Any, force: bool = False, verify: bool = False
) -> dict[str, Any]:
    """Run a stage's task keyed by `ver.version`, publish its summary, and return it (cached flag set).

    A complete version is a Prefect cache hit; a version whose artifact folder is gone (or `force`)
    refreshes the cache, so a deleted artifact is never a stale hit. So does one the warehouse does not register
    as complete (a run killed between its manifest and its rows): the task then only registers it. Before
    reuse a complete version's files are checked against its manifest: size and mtime, or with `verify` their
    sha256 (reads every file).
    """
    with keeping_old_version(ver):  # settles a killed forced run's backup before anything is decided
        return _run_stage_task(stage_task, cfg, ver, *args, force=force, verify=verify)


def _run_stage_task(stage_task: Task, cfg: PipelineConfig, ver: StageVersion, *args: Any, force: bool,
                    verify: bool) -> dict[str, Any]:
    # A file changed after completion is never a stale hit (a forced run rebuilds the version anyway).
    reopened = not force and reverify_on_reuse(ver, full=verify)
    refresh = (force or reopened or not ver.artifact.is_complete()
               or not is_registered_complete(warehouse_path(cfg.home), ver.version))
    # Prefect keeps results per user (~/.prefect/storage), not per home: the key names the home too, so a hit
    # never returns a summary whose paths point into another (maybe deleted) home with the same version.
    home = hashlib.sha256(str(cfg.home).encode()).hexdigest()[:12]  # absolute: resolved at validation
    key = f"loralens-{ver.stage}-{ver.version}-{home}"
    with results_under_home(cfg):
        # The cache key of every stage task (one set on a task decorator would be overridden here).
        state = stage_task.with_options(refresh_cache=refresh, cache_key_fn=lambda *_: key)(
            cfg, ver, *args, force, return_state=True)
    summary = dict(state.result())
    summary["cached"] = summary["cached"] or state.name == "Cached"
    rows = [{"key": k, "value": str(v)} for k, v in summary.items() if not isinstance(v, dict)]
    create_table_artifact(key=f"{ver.stage}-summary", table=rows,
                          description=f"{ver.stage} stage, version {ver.version}")
    return summary
