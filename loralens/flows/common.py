"""Shared flow helpers: config resolution and per-home result storage for cached tasks."""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from prefect import Task
from prefect.artifacts import create_table_artifact
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from loralens.config import PipelineConfig, load_config, parse_config
from loralens.lens.runtime.devices import agreed_dtype, auto_here, check_local_workers
from loralens.tasks.memory import ensure_fits
from loralens.tasks.stage_versions import (
    StageVersion,
    keeping_old_version,
    require_complete,
    reset_for_force,
    reverify_on_reuse,
)
from loralens.tasks.warehouse_index import ensure_indexed


def load_entry(entry: str) -> Any:
    """Return the object a `module:name` entry names (a registered stage's `run` or `flow`)."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


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


# The Dask worker pool of the innermost `scale_out` block; None: work units run in this process.
_POOL: ContextVar[Any] = ContextVar("loralens_worker_pool", default=None)


@contextmanager
def scale_out(workers: int = 1, dask_address: str | None = None, cfg: PipelineConfig | None = None) -> Iterator[Any]:
    """Yield the Dask worker pool (`flows/dask_workers.py`) stages map their work units on while the block runs,
    or None (everything in this process).

    `dask_address` connects to that scheduler now; otherwise `workers > 1` starts a local cluster of that many
    single-threaded worker processes when a stage first has units to map (a run where every stage is cached
    starts none), shut down when the block ends; `workers: 1` keeps everything in this process. With `cfg`, each
    local worker's memory_limit comes from its memory plan. Inside an open block (the pipeline opens one for all
    its stages) this yields the open pool.
    """
    if _POOL.get() is not None or (workers <= 1 and not dask_address):
        yield _POOL.get()
        return
    from loralens.flows.dask_workers import WorkerPool  # Dask is imported only when it is used

    pool = WorkerPool(workers, dask_address, cfg)
    token = _POOL.set(pool)
    try:
        yield pool
    finally:
        _POOL.reset(token)
        pool.close()


def pin_dtype(cfg: PipelineConfig, pool: Any = None) -> PipelineConfig:
    """Return `cfg` with `model.dtype: auto` replaced by the dtype it means where the model runs; call it before
    any version is computed (versions hash the resolved dtype, and every process then loads that dtype).

    The one place that decides: on an existing scheduler (`pool.address`) every worker answers for itself
    (`WorkerPool.resolve_auto`), so a CPU head node never hashes float32 for GPU workers that compute in bf16;
    workers that disagree are a one-line DeviceError naming `model.dtype` (`devices.agreed_dtype`). Otherwise
    (no pool, or a local cluster on this machine) this process answers. An explicit dtype is returned as is,
    asking no worker.
    """
    m = cfg.model
    if m.dtype != "auto":
        return cfg
    if pool is not None and pool.address:
        answers = pool.resolve_auto(m.device, m.dtype)
    else:
        answers = {"this process": auto_here(m.device, m.dtype)}
    return cfg.model_copy(update={"model": m.model_copy(update={"dtype": agreed_dtype(answers)})})


def pinned_config(cfg: PipelineConfig) -> PipelineConfig:
    """Return `cfg` with its dtype pinned (`pin_dtype`) for a flow that runs in this process alone (train,
    attribute, select): on `run.dask_address`'s workers when the config names one (its versions must equal those
    of the runs that used them), else here."""
    with scale_out(1, cfg.run.dask_address, cfg=cfg) as pool:
        return pin_dtype(cfg, pool)


def run_workers(cfg: PipelineConfig, workers: int | None, dask_address: str | None) -> tuple[int, str | None]:
    """Return the (workers, dask_address) a flow runs with: its parameters where given, else `cfg.run`'s."""
    if workers is None and dask_address is None:
        return cfg.run.workers, cfg.run.dask_address
    address = cfg.run.dask_address if dask_address is None else dask_address or None  # "" clears the config's
    run = parse_config({"run": {"workers": cfg.run.workers if workers is None else workers,
                                "dask_address": address}}).run
    return run.workers, run.dask_address


def map_units(worker_task: Task, args: tuple, units: list[int]) -> list[Any]:
    """Run `worker_task(*args, [unit])` for every unit as one mapped Prefect task on the Dask workers; return the
    results in unit order once all have finished (raising the first failure).

    One task per unit: a worker process killed mid-unit loses that unit only, which Dask runs again on another
    worker. Needs an open `scale_out` block with a pool.
    """
    pool = _POOL.get()
    runner = pool.runner()
    names = list(inspect.signature(worker_task.fn).parameters)[: len(args) + 1]
    with pool.submit_settings():
        futures = [runner.submit(worker_task, dict(zip(names, (*args, [unit]), strict=True))) for unit in units]
    for future in futures:
        future.wait()
    return [future.result() for future in futures]


def local_workers(workers: int, dask_address: str | None = None) -> int:
    """Return how many worker processes of a run with `workers` and `dask_address` (`run_workers`) share this
    machine: `workers` (a local cluster, or this process alone), 1 on an existing scheduler (its workers are sized
    where they run)."""
    return 1 if dask_address else max(workers, 1)


def local_cluster_workers(workers: int) -> int:
    """Return how many worker processes of this run share this machine (`local_workers`): the open pool's, else
    `workers`."""
    pool = _POOL.get()
    return local_workers(workers) if pool is None else local_workers(pool.workers, pool.address)


def split_over_workers(cfg: PipelineConfig, ver: StageVersion, worker_task: Task, args: tuple,
                       units: Callable[[], list[int]], workers: int, force: bool,
                       upstream: tuple[StageVersion, ...] = (), prepare: Callable[[], None] | None = None) -> bool:
    """Map a stage's work units over Dask worker processes (`worker_task(*args, [unit])` per unit, `map_units`)
    unless the version is complete or no runner is asked for; return the `force` left for the finalizing task.

    The pool is the open `scale_out` block's, else a local cluster of `workers` processes for this call; with
    neither (`workers: 1`) the stage runs in this process and this returns `force` untouched. With `force`, the
    version is reset once here, before any worker writes but after the `upstream` versions are checked complete
    (the finalizing task then sees an empty version, so it gets force=False). Call it and the finalizing
    `run_stage_task` inside one `keeping_old_version(ver)`, which keeps the old complete version until the new one
    is. `units` is called only when there is work to split. Before any unit is mapped (and before anything is
    written) a GPU run's local workers are checked to get one GPU each (`check_local_workers`) and the stage's
    predicted peak is checked against this machine's memory, times the local cluster's
    workers (each holds its own model copy; `ensure_fits`); then `prepare`, if given, runs here once (decode
    scores the vocabulary there, for every worker to read). Workers write Parquet only and drop their models once
    the units are done (`WorkerPool.free_models`); the finalizing task, in this process, writes the manifest and
    the warehouse rows.
    """
    if _POOL.get() is None and workers <= 1:
        return force
    if force:
        for up in upstream:
            require_complete(up)
        reset_for_force(ver)
    if not ver.artifact.is_complete():
        todo = [u for u in units() if ver.artifact.shard_files(u) is None]  # a unit is its shard: skip done ones
        if todo:  # none (a run killed before finalizing): start no cluster
            check_local_workers(cfg.model.device, local_cluster_workers(workers))  # one GPU per local worker
            ensure_fits(cfg, ver.stage, workers=local_cluster_workers(workers))
            if prepare is not None:
                prepare()
            with results_under_home(cfg), scale_out(workers, cfg=cfg) as pool:
                map_units(worker_task, args, todo)
                pool.free_models()  # the finalizing task loads the model here, on the GPU a worker's copy is on
    return False


def run_stage_task(
    stage_task: Task, cfg: PipelineConfig, ver: StageVersion, *args: Any, force: bool = False, verify: bool = False
) -> dict[str, Any]:
    """Run a stage's task keyed by `ver.version`, publish its summary, and return it (cached flag set).

    The manifest alone says whether the version is complete: only then may the task be a Prefect cache hit; a
    version without one (its folder gone, a run killed before it, a file that failed its check) or `force`
    refreshes the cache, so Prefect never takes an incomplete version for done. The warehouse is an index of the
    manifests: after a hit, rows it lacks (a run killed between its manifest and its rows, a deleted warehouse)
    are loaded back from the artifact (`ensure_indexed`). Before reuse a complete version's files are checked
    against its manifest: size and mtime, or with `verify` their sha256 (reads every file).
    """
    with keeping_old_version(ver):  # settles a killed forced run's backup before anything is decided
        return _run_stage_task(stage_task, cfg, ver, *args, force=force, verify=verify)


def _run_stage_task(stage_task: Task, cfg: PipelineConfig, ver: StageVersion, *args: Any, force: bool,
                    verify: bool) -> dict[str, Any]:
    # A file changed after completion is never a stale hit (a forced run rebuilds the version anyway).
    reopened = not force and reverify_on_reuse(ver, full=verify)
    refresh = force or reopened or not ver.artifact.is_complete()
    # Prefect keeps results per user (~/.prefect/storage), not per home: the key names the home too, so a hit
    # never returns a summary whose paths point into another (maybe deleted) home with the same version.
    home = hashlib.sha256(str(cfg.home).encode()).hexdigest()[:12]  # absolute: resolved at validation
    key = f"loralens-{ver.stage}-{ver.version}-{home}"
    with results_under_home(cfg):
        # The cache key of every stage task (one set on a task decorator would be overridden here).
        state = stage_task.with_options(refresh_cache=refresh, cache_key_fn=lambda *_: key)(
            cfg, ver, *args, force, return_state=True)
    summary = dict(state.result())
    if state.name == "Cached":
        ensure_indexed(ver)
    summary["cached"] = summary["cached"] or state.name == "Cached"
    rows = [{"key": k, "value": str(v)} for k, v in summary.items() if not isinstance(v, dict)]
    create_table_artifact(key=f"{ver.stage}-summary", table=rows,
                          description=f"{ver.stage} stage, version {ver.version}")
    return summary
