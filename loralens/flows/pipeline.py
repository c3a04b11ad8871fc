"""The Lora Lens pipeline flow: every registered stage in order (tasks/registry.py), cache -> train -> decode ->
attribute -> select -> intervene."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from loralens.config import PipelineConfig
from loralens.flows.common import load_entry, pin_dtype, resolve_config, run_workers, scale_out
from loralens.lens.runtime.devices import check_local_workers
from loralens.tasks.registry import REGISTRY, get_stage
from loralens.tasks.report import run_report
from loralens.tasks.stages.cache import cache_version

__all__ = ["pipeline", "write_run_report"]


@flow(name="loralens-pipeline")
def pipeline(
    config_path: str | None = None,
    config: dict[str, Any] | None = None,
    only: str | None = None,
    force: bool = False,
    workers: int | None = None,
    verify: bool = False,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Run every stage (or `only` one), each skipped when its artifact version is already complete.

    `workers > 1` splits caching (by prompt shard), decoding (by cache shard) and generation (by prompt batch) over
    a local Dask cluster of that many worker processes, `dask_address` over an existing Dask scheduler's workers
    (both default to the config's `run` section); one cluster serves every stage of the run. Train and attribute
    run in this process (attribute is one DuckDB aggregation over decode's Parquet, no model); before each stage
    that runs here the workers drop the models they hold.
    Before reusing a complete version its files are checked against the manifest by size and mtime; `verify`
    re-hashes them (sha256) instead, reading every file.
    """
    stages = REGISTRY if only is None else (get_stage(only),)  # an unknown name: one line listing the stages
    cfg = resolve_config(config_path, config)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    workers, dask_address = run_workers(cfg, workers, dask_address)
    if not dask_address:
        check_local_workers(cfg.model.device, workers)  # before any stage: one GPU per local worker
    with scale_out(workers, dask_address, cfg=cfg) as pool:
        cfg = pin_dtype(cfg, pool)  # `auto` as the workers resolve it, before any version
        cache_ver = cache_version(cfg)  # one read of the corpus and model fingerprint serves every stage
        for stage in stages:
            t0 = time.perf_counter()
            if pool is not None and not stage.splits:
                pool.free_models()  # train's ranks (and select's model) need the GPUs and RAM the workers' models hold
            split = {"workers": workers} if stage.splits else {}
            results[stage.name] = load_entry(stage.run)(cfg, cache_ver, force=force, verify=verify, **split)
            seconds[stage.name] = time.perf_counter() - t0
    report = write_run_report(cfg, results, seconds)
    results[list(results)[-1]]["run_report"] = str(report)
    return results


def write_run_report(cfg: PipelineConfig, results: dict[str, Any], seconds: dict[str, float]) -> Path:
    """Write this run's report under `<home>/reports/` and link it from the flow run as a Prefect artifact."""
    run = flow_run.get_name() or "local"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = cfg.home / "reports" / f"run-{stamp}-{run}.md"
    run_report(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), results, seconds, path,
               title=f"{run} ({stamp} UTC)")
    create_markdown_artifact(key="run-report", markdown=path.read_text(encoding="utf-8"),
                             description=f"Lora Lens run report, also saved as {path}")
    create_link_artifact(key="run-report-file", link=path.as_uri(), description="the run report file")
    return path
