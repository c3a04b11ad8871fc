"""The Lora Lens pipeline flow: cache -> train -> decode -> attribute -> select -> intervene."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from loralens.config import PipelineConfig
from loralens.flows.attribute import attribute_stage
from loralens.flows.cache import cache_stage
from loralens.flows.common import resolve_config, run_workers, scale_out
from loralens.flows.decode import decode_stage
from loralens.flows.intervene import intervene_stage
from loralens.flows.select import select_stage
from loralens.flows.train import train_stage
from loralens.tasks.report import run_report
from loralens.tasks.stages.cache import cache_version
from loralens.warehouse.constants import STAGES

__all__ = ["STAGES", "pipeline", "write_run_report"]


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
    run in this process (attribute is one DuckDB aggregation over decode's Parquet, no model).
    Before reusing a complete version its files are checked against the manifest by size and mtime; `verify`
    re-hashes them (sha256) instead, reading every file.
    """
    if only is not None and only not in STAGES:
        raise ValueError(f"unknown stage '{only}'; stages: {', '.join(STAGES)}")
    cfg = resolve_config(config_path, config)
    cache_ver = cache_version(cfg)  # one read of the corpus and model fingerprint serves every stage
    stages = {"cache": cache_stage, "train": train_stage, "decode": decode_stage, "attribute": attribute_stage,
              "select": select_stage, "intervene": intervene_stage}
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    workers, dask_address = run_workers(cfg, workers, dask_address)
    with scale_out(workers, dask_address):
        for name in STAGES:
            if only in (None, name):
                t0 = time.perf_counter()
                split = {"workers": workers} if name in ("cache", "decode", "intervene") else {}
                results[name] = stages[name](cfg, cache_ver, force=force, verify=verify, **split)
                seconds[name] = time.perf_counter() - t0
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
