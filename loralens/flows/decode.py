"""Flow `decode_heads`: the decode stage (needs a complete train version), whole or split by cache shard."""

from __future__ import annotations

from typing import Any

from prefect import flow

from loralens.config import PipelineConfig
from loralens.flows.common import pin_dtype, resolve_config, run_stage_task, run_workers, scale_out, split_over_workers
from loralens.tasks.chain import stage_chain
from loralens.tasks.stage_versions import StageVersion, keeping_old_version, require_complete
from loralens.tasks.stages.decode import cache_shard_indices, decode_shards_task, decode_task, score_vocabulary


def decode_stage(cfg: PipelineConfig, cache_ver: StageVersion | None = None, force: bool = False,
                 workers: int = 1, verify: bool = False) -> dict[str, Any]:
    """Run the decode task keyed by its version (the train version is its input).

    `workers > 1` (or an open `scale_out` block) first scores the vocabulary here, once, then maps the cache
    shards not yet decoded over Dask worker processes (Parquet only); the keyed task then finalizes in this
    process (DuckDB and the manifest).
    """
    chain = stage_chain(cfg, "decode", cache_ver)
    ver, train_ver, cache_ver = chain["decode"], chain["train"], chain["cache"]

    def units() -> list[int]:
        require_complete(train_ver)
        require_complete(cache_ver)
        return sorted(cache_shard_indices(cache_ver))

    with keeping_old_version(ver):  # one guard over the vocabulary scoring, the workers and the finalizing task
        force = split_over_workers(cfg, ver, decode_shards_task, (cfg, ver, train_ver, cache_ver), units, workers,
                                   force, (train_ver, cache_ver), prepare=lambda: score_vocabulary(cfg, ver))
        return run_stage_task(decode_task, cfg, ver, train_ver, cache_ver, force=force, verify=verify)


@flow(name="decode-heads")
def decode_heads(
    config_path: str | None = None,
    config: dict[str, Any] | None = None,
    force: bool = False,
    workers: int | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Decode every head's output through its trained lens and the logit lens into top-k tokens.

    `workers=N` maps the cache shards over a local Dask cluster of N worker processes, `dask_address` over an
    existing scheduler's workers (both default to the config's `run` section); the vocabulary is scored once here
    first, and this process loads DuckDB and writes the manifest once every shard is decoded.
    """
    cfg = resolve_config(config_path, config)
    workers, dask_address = run_workers(cfg, workers, dask_address)
    with scale_out(workers, dask_address, cfg=cfg) as pool:
        cfg = pin_dtype(cfg, pool)  # `auto` as the workers resolve it, before any version
        return decode_stage(cfg, force=force, workers=workers)
