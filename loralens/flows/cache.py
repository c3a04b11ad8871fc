"""Flow `cache_activations`: the cache stage on its own, whole or split by prompt shard over workers."""

from __future__ import annotations

from typing import Any

from prefect import flow

from loralens.config import PipelineConfig
from loralens.flows.common import resolve_config, results_under_home, run_stage_task, split_over_workers
from loralens.tasks.cache import cache_shards_task, cache_task, plan_cache, shard_count
from loralens.tasks.plans import StagePlan, keeping_old_version


def cache_stage(cfg: PipelineConfig, plan: StagePlan | None = None, force: bool = False,
                workers: int = 1, verify: bool = False) -> dict[str, Any]:
    """Run the cache task keyed by its version (planned here unless the caller already planned it).

    `workers > 1` first maps the missing shards over that many concurrent tasks; the keyed task then finalizes.
    """
    plan = plan or plan_cache(cfg)
    with keeping_old_version(plan):  # one guard over the workers and the finalizing task
        force = split_over_workers(cfg, plan, cache_shards_task, (cfg, plan),
                                   lambda: list(range(shard_count(cfg))), workers, force)
        return run_stage_task(cache_task, cfg, plan, force=force, verify=verify)


@flow(name="cache-activations")
def cache_activations(
    config_path: str | None = None,
    config: dict[str, Any] | None = None,
    force: bool = False,
    workers: int = 1,
    shards: list[int] | None = None,
) -> dict[str, Any]:
    """Cache per-head attention inputs and lens targets of a frozen model over a prompt corpus.

    `workers > 1` maps the shards over that many concurrent tasks (threads with the default task runner; one
    machine each with a distributed task runner), then finalizes. `shards` caches only those shard indices and
    returns without finalizing unless every shard is done: one worker's share when several deployment runs on
    different machines share the artifact folder (a last run without `shards` writes the manifest).
    """
    cfg = resolve_config(config_path, config)
    plan = plan_cache(cfg)
    if shards is not None:
        with results_under_home(cfg):
            return cache_shards_task(cfg, plan, sorted(shards))
    return cache_stage(cfg, plan, force=force, workers=workers)
