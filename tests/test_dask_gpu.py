"""Dask workers on GPU machines: models load straight onto a worker's device, local workers get a memory_limit from
the memory plan, and workers drop their held models before a stage that runs in the flow process.

The pure parts are checked with injected values (no GPU here); the cluster parts on a real local cluster started by
the project's `WorkerPool`, holding a real tiny model.
"""

from __future__ import annotations

import os

import pytest
import torch

from loralens.config import parse_config
from loralens.lens.runtime.models import load_model, placement_kwargs
from loralens.tasks.memory import (
    SPLIT_STAGES,
    WORKER_HEADROOM,
    WORKER_OVERHEAD_BYTES,
    predict,
    worker_limit_bytes,
    worker_memory_limit,
)
from tests.test_intervene import config

GIB = 2**30


def test_a_gpu_model_loads_straight_onto_its_device(tiny_models, tmp_path):
    """On a GPU every weight is loaded onto the worker's device by from_pretrained (device_map {"": device}); a
    configured device_map is kept; on a CPU nothing is passed and the model loads on the host as before."""
    assert placement_kwargs("cuda:0") == {"device_map": {"": "cuda:0"}}
    assert placement_kwargs(torch.device("cuda", 3)) == {"device_map": {"": "cuda:3"}}
    assert placement_kwargs("cuda:1", device_map="auto") == {"device_map": "auto"}
    assert placement_kwargs("cpu") == {} == placement_kwargs(torch.device("cpu"))
    loaded = load_model(str(tiny_models["llama"]), tmp_path, device="cpu")
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert getattr(loaded.model, "hf_device_map", None) is None  # the CPU path: loaded, then placed, as before


def test_worker_limit_is_the_largest_peak_with_headroom_capped_by_a_share_of_the_host():
    assert worker_limit_bytes([GIB, 3 * GIB, 2 * GIB], 2, 100 * GIB) == int(3 * GIB * WORKER_HEADROOM
                                                                             + WORKER_OVERHEAD_BYTES)
    assert worker_limit_bytes([GIB, 3 * GIB], 4, 8 * GIB) == 2 * GIB  # 4 workers share 8 GB
    assert worker_limit_bytes([GIB], 1, 10 * GIB, headroom=2.0, overhead=0) == 2 * GIB


def _cfg(tmp_path, model):
    raw = config(tmp_path / "home", model)
    raw["model"] = {**raw["model"], "device": "cpu", "dtype": "float32"}
    return parse_config(raw)


def _holds_model() -> bool:
    from loralens.tasks.workers.worker_process import _state

    return _state["model"] is not None


def _hold_model(cfg) -> bool:  # noqa: ANN001 - a PipelineConfig
    from loralens.tasks.workers.worker_process import stage_model

    stage_model(cfg)  # a worker process keeps it (`_state["model"]`) for its next units
    return _holds_model()


@pytest.fixture(scope="module")
def pool(prefect_server, tiny_models, tmp_path_factory):
    """The project's WorkerPool: a real local cluster of 2 workers for the tiny llama's config, with 64 GB as the
    host's memory (LORALENS_MEMORY_LIMIT) so the expected limit does not move with this machine's free memory."""
    from loralens.flows.dask_workers import WorkerPool

    cfg = _cfg(tmp_path_factory.mktemp("dask-gpu"), tiny_models["llama"])
    before = os.environ.get("LORALENS_MEMORY_LIMIT")
    os.environ["LORALENS_MEMORY_LIMIT"] = "64G"
    pool = WorkerPool(2, None, cfg)
    try:
        pool.runner()
        yield cfg, pool
    finally:
        pool.close()
        if before is None:
            os.environ.pop("LORALENS_MEMORY_LIMIT", None)
        else:
            os.environ["LORALENS_MEMORY_LIMIT"] = before


def test_local_workers_get_the_memory_plans_limit(pool):
    """Each local worker's memory_limit is the plan's: the largest split stage's peak with headroom, not Dask's
    default (the host's memory over the workers)."""
    cfg, p = pool
    want = worker_memory_limit(cfg, 2)
    assert want == worker_limit_bytes([predict(cfg, s).per_process for s in SPLIT_STAGES], 2, 64 * GIB)
    assert want < 32 * GIB  # below Dask's default share of the injected host memory
    limits = [w["memory_limit"] for w in p.runner().client.scheduler_info(n_workers=-1)["workers"].values()]
    assert limits == [want, want]


def test_workers_drop_their_held_models(pool):
    """After `free_models` no worker holds a model (it said it held one), and the next unit loads it again."""
    cfg, p = pool
    client = p.runner().client
    assert set(client.run(_hold_model, cfg).values()) == {True}
    assert set(p.free_models().values()) == {True}
    assert set(client.run(_holds_model).values()) == {False}
    assert set(client.run(_hold_model, cfg).values()) == {True}


def test_each_local_worker_gets_one_gpu_of_those_it_inherits():
    """Worker i pins GPU i of the ones its process sees, named as an inherited CUDA_VISIBLE_DEVICES names them."""
    from loralens.flows.dask_workers import worker_gpu

    assert [worker_gpu(i, None, 2) for i in range(3)] == ["0", "1", "0"]
    assert [worker_gpu(i, "4,6", 2) for i in range(2)] == ["4", "6"]  # e.g. SLURM's allocation, not GPUs 0 and 1
    assert worker_gpu(1, "GPU-aa, GPU-bb", 2) == "GPU-bb"
    assert worker_gpu(0, None, 1) is None and worker_gpu(1, "3", 1) is None  # one GPU (or none): keep it
