"""What a Dask worker process keeps between the work units it runs: its model and scorer, each loaded once.

A worker process runs many units (cache shards, decode shards, generation batches) one after another. `stage_model`,
`stage_reader` (decode's lean model and lens banks) and `stage_scorer` load on the first unit and hand the same
objects to every later unit with the same identity (the model folder's files by name, size and mtime, dtype,
device, revision; for the reader also the lens files and layers; the scorer's name and options); a unit of another
model replaces it, so a worker holds one model (full or lean) at a time. Outside a worker process (`workers: 1`,
the flow process) they load afresh each call, as before, so nothing stays in memory after a stage.
"""

from __future__ import annotations

import gc
import json
import threading
from pathlib import Path
from typing import Any

from loralens.config import PipelineConfig
from loralens.lens.evaluation.generation import RNG_LOCK
from loralens.lens.evaluation.scorers import ToxicityScorer, get_scorer
from loralens.lens.runtime.devices import host_compute_dtype
from loralens.lens.runtime.models import LoadedModel, load_model, resolve_model_path
from loralens.tasks.lens_loading import load_reader
from loralens.tasks.stage_versions import StageVersion
from loralens.warehouse.constants import LENSES_DIR
from loralens.warehouse.db import forbid_writes

_state: dict[str, Any] = {"worker": False, "model": None, "scorer": None}
_lock = threading.Lock()
loads = {"model": 0, "reader": 0, "scorer": 0}  # how many times this process loaded each (one per identity on a worker)


def mark_worker_process() -> None:
    """Mark this process a work-unit worker: keep models between units, never write the warehouse."""
    _state["worker"] = True
    forbid_writes("a Dask worker process: only the flow process writes DuckDB")


def is_worker_process() -> bool:
    """Return whether this process is a work-unit worker (set up by the Dask worker plugin)."""
    return bool(_state["worker"])


def _files(folder: Path, *, deep: bool = False) -> str:
    """Return the files in `folder` (`deep`: under it) by relative name, size and mtime: a changed file is
    another model."""
    if not folder.is_dir():
        return "[]"
    return json.dumps(sorted([str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
                             for p in (folder.rglob("*") if deep else folder.iterdir()) if p.is_file()))


def _model_identity(cfg: PipelineConfig) -> tuple:
    m = cfg.model
    path = resolve_model_path(m.name, cfg.home, m.revision)
    return (str(path), _files(Path(path)), m.resolved_dtype(), str(m.torch_device()), m.device_map, m.revision,
            m.trust_remote_code)


def _held(key: tuple, load: Any) -> Any:
    """Return the model slot's object for `key`, loading it (after freeing any other) when the slot holds another."""
    with _lock:
        held = _state["model"]
        if held is None or held[0] != key:
            _state["model"] = None  # free the old model before loading another
            _state["model"] = (key, load())
        return _state["model"][1]


def free_held_model() -> bool:
    """Drop the model (or decode's lean model and reader) this process holds and hand CUDA's cached blocks back to
    the GPU (`torch.cuda.empty_cache`, where CUDA is available); return whether one was held. Every worker runs it
    before a stage that runs in the flow process (the train stage's ranks need the GPUs: `WorkerPool.free_models`);
    the next unit loads its model again."""
    import torch

    with _lock:
        held = _state["model"] is not None
        _state["model"] = None
    gc.collect()  # the model's tensors go now, not at the next collection
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return held


def stage_model(cfg: PipelineConfig, *, host_float32: bool = False) -> LoadedModel:
    """Return the frozen model of `cfg.model`: loaded once per worker process, afresh elsewhere. With
    `host_float32` (select, intervene), a half-precision model on a CPU is loaded in float32
    (`devices.host_compute_dtype`)."""
    if host_float32:
        m = cfg.model
        dtype = host_compute_dtype(m.resolved_dtype(), m.torch_device())
        if dtype != m.resolved_dtype():
            cfg = cfg.model_copy(update={"model": m.model_copy(update={"dtype": dtype})})
    if not _state["worker"]:
        return _load(cfg)
    return _held(("model", *_model_identity(cfg)), lambda: _load(cfg))


def stage_reader(cfg: PipelineConfig, train_ver: StageVersion, layers: list[int]) -> tuple[Any, Any]:
    """Return decode's (lean model, HeadReader) for `layers` of `train_ver`'s lenses (`tasks.lens_loading.load_reader`):
    loaded once per worker process, afresh elsewhere."""
    if not _state["worker"]:
        return _load_reader(cfg, train_ver, layers)
    key = ("reader", *_model_identity(cfg), str(train_ver.artifact.path),
           _files(train_ver.artifact.path / LENSES_DIR, deep=True), tuple(layers))
    return _held(key, lambda: _load_reader(cfg, train_ver, layers))


def _load_reader(cfg: PipelineConfig, train_ver: StageVersion, layers: list[int]) -> tuple[Any, Any]:
    loaded = load_reader(cfg, train_ver, layers)
    loads["reader"] += 1
    return loaded


def _load(cfg: PipelineConfig) -> LoadedModel:
    m = cfg.model
    with RNG_LOCK:  # loading draws from torch's global RNG: never while another thread samples
        loaded = load_model(m.name, cfg.home, dtype=m.resolved_dtype(), revision=m.revision,
                            trust_remote_code=m.trust_remote_code, device=m.torch_device(), device_map=m.device_map)
    loads["model"] += 1
    return loaded


def stage_scorer(name: str, options: dict[str, Any]) -> ToxicityScorer:
    """Return the toxicity scorer `name` built with `options`: once per worker process, afresh elsewhere."""
    key = (name, json.dumps(options, sort_keys=True, default=str))
    with _lock:
        held = _state["scorer"]
        if _state["worker"] and held is not None and held[0] == key:
            return held[1]
        with RNG_LOCK:
            scorer = get_scorer(name, **options)
        loads["scorer"] += 1
        if _state["worker"]:
            _state["scorer"] = (key, scorer)
        return scorer
