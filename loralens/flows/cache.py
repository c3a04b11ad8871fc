"""Flow `cache_activations`: the cache stage on its own, whole or split by prompt shard over workers."""

from __future__ import annotations

from typing import Any

from prefect import flow

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
from loralens.tasks.stage_versions import StageVersion, keeping_old_version
from loralens.tasks.stages.cache import cache_shards_task, cache_task, cache_version, shard_count


def cache_stage(cfg: PipelineConfig, ver: StageVersion | None = None, force: bool = False,
                workers: int = 1, verify: bool = False) -> dict[str, Any]:
    """Run the cache task keyed by its version (computed here unless the caller passes it).

    `workers > 1` (or an open `scale_out` block) first maps the missing shards over Dask worker processes; the
    keyed task then finalizes in this process.
    """
    ver = ver or cache_version(cfg)
    with keeping_old_version(ver):  # one guard over the workers and the finalizing task
        force = split_over_workers(cfg, ver, cache_shards_task, (cfg, ver),
                                   lambda: list(range(shard_count(cfg))), workers, force)
        return run_stage_task(cache_task, cfg, ver, force=force, verify=verify)


@flow(name="cache-activations")
def cache_activations(
    config_path: str | None = None,
    config: dict[str, Any] | None = None,
    force: bool = False,
    workers: int | None = None,
    shards: list[int] | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Cache per-head attention inputs and lens targets of a frozen model over a prompt corpus.

    `workers > 1` maps the shards over a local Dask cluster of that many worker processes, `dask_address` over an
    existing Dask scheduler's workers (both default to the config's `run` section), then finalizes here.
    `shards` caches only those shard indices and returns without finalizing unless every shard is done: one
    worker's share when several deployment runs on different machines share the artifact folder (a last run
    without `shards` writes the manifest).
    """
    cfg = resolve_config(config_path, config)
    if shards is not None:  # this process caches them: `auto` is what it means here
        cfg = pin_dtype(cfg)
        with results_under_home(cfg):
            return cache_shards_task(cfg, cache_version(cfg), sorted(shards))
    workers, dask_address = run_workers(cfg, workers, dask_address)
    with scale_out(workers, dask_address, cfg=cfg) as pool:
        cfg = pin_dtype(cfg, pool)  # `auto` as the workers resolve it, before the version
        return cache_stage(cfg, cache_version(cfg), force=force, workers=workers)
