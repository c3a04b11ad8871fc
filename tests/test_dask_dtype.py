"""`model.dtype: auto` on an existing Dask scheduler is resolved on its workers, not in the flow process (issue 22):
a CPU head node with GPU workers must hash the dtype the workers compute in. On a real 2-process
`distributed.LocalCluster`: the answers come from the worker processes, CPU workers pin float32, workers whose
torch sees a GPU pin bfloat16, workers that disagree stop the pipeline before any stage in one line, and an
explicit dtype asks no worker."""

from __future__ import annotations

import os

import pytest
import torch

from loralens.config import parse_config
from loralens.flows.common import pin_dtype, scale_out
from loralens.lens.runtime.devices import DeviceError, agreed_dtype
from loralens.tasks.stages.cache import cache_version
from tests.test_intervene import config
from tests.test_scale_out import worker_calls

HERE = "bfloat16" if torch.cuda.is_available() else "float32"


def _seem_to_have_a_gpu() -> bool:
    """In a worker process: make torch report one CUDA device (what a GPU worker's torch says; nothing is run
    on it: resolving `auto` only asks)."""
    torch.cuda._loralens_saved = (torch.cuda.is_available, torch.cuda.device_count)
    torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: 1)
    return True


def _restore_torch() -> bool:
    saved = getattr(torch.cuda, "_loralens_saved", None)
    if saved is not None:
        torch.cuda.is_available, torch.cuda.device_count = saved
        del torch.cuda._loralens_saved
    return True


def _on_workers(cluster, fn, count: int | None = None) -> None:
    """Run `fn` on the first `count` workers of `cluster` (all when None)."""
    from distributed import Client

    with Client(cluster.scheduler_address, timeout="10s") as client:
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        client.run(fn, workers=workers if count is None else workers[:count])


@pytest.fixture
def gpu_looking_workers(dask_cluster):
    """Yield a function that makes the first N workers' torch report a GPU; every worker is restored after."""
    yield lambda n=None: _on_workers(dask_cluster, _seem_to_have_a_gpu, n)
    _on_workers(dask_cluster, _restore_torch)


def _cfg(tmp_path, model, **fields):
    return parse_config({"home": str(tmp_path / "home"), "model": {"name": str(model), **fields}})


def test_auto_is_resolved_in_the_worker_processes_and_pins_float32_on_cpu(dask_cluster, tiny_models, tmp_path):
    """Every worker answers for itself (its own pid, not the flow's); on these CPU workers `auto` pins float32, the
    same version as an explicit float32."""
    cfg = _cfg(tmp_path, tiny_models["llama"])
    with scale_out(dask_address=dask_cluster.scheduler_address) as pool:
        answers = pool.resolve_auto("auto", "auto")
        pinned = pin_dtype(cfg, pool)
    worker_pids = worker_calls(dask_cluster, os.getpid)
    assert sorted(a["pid"] for a in answers.values()) == sorted(worker_pids) and os.getpid() not in worker_pids
    assert {a["dtype"] for a in answers.values()} == {HERE} and pinned.model.dtype == HERE
    explicit = _cfg(tmp_path, tiny_models["llama"], dtype=HERE)
    assert cache_version(pinned).version == cache_version(explicit).version


def test_gpu_workers_pin_bf16_where_the_flow_process_would_say_float32(dask_cluster, gpu_looking_workers,
                                                                       tiny_models, tmp_path):
    """The issue's case: workers whose torch sees a GPU pin bfloat16 (and the version hashes it) although this
    CPU process resolves `auto` to float32."""
    if torch.cuda.is_available():
        pytest.skip("this process has CUDA: it resolves bfloat16 itself")
    gpu_looking_workers()
    cfg = _cfg(tmp_path, tiny_models["llama"])
    with scale_out(dask_address=dask_cluster.scheduler_address) as pool:
        pinned = pin_dtype(cfg, pool)
    assert cfg.model.resolved_dtype() == "float32" and pinned.model.dtype == "bfloat16"
    bf16 = _cfg(tmp_path, tiny_models["llama"], dtype="bfloat16")
    assert cache_version(pinned).version == cache_version(bf16).version != cache_version(cfg).version


def test_workers_that_disagree_stop_the_pipeline_before_any_stage(dask_cluster, gpu_looking_workers, tiny_models,
                                                                  tmp_path):
    """One worker with a GPU, one without: a one-line error naming model.dtype and each kind of worker, before any
    stage runs (nothing written)."""
    from loralens.flows.pipeline import pipeline

    if torch.cuda.is_available():
        pytest.skip("the workers have CUDA: they cannot be made to disagree by hiding it")
    gpu_looking_workers(1)
    home = tmp_path / "home"
    with pytest.raises(DeviceError) as err:
        pipeline(config=config(home, tiny_models["llama"]), dask_address=dask_cluster.scheduler_address)
    msg = str(err.value)
    assert msg.startswith("config error: model.dtype: auto resolves differently on the Dask workers (")
    assert "\n" not in msg
    assert "bfloat16 on cuda at tcp://" in msg and "float32 on cpu at tcp://" in msg and "set model.dtype" in msg
    assert not (home / "artifacts").exists()


def test_an_explicit_dtype_asks_no_worker(tiny_models, tmp_path):
    """An explicit dtype is the config itself (no pool is asked); with no pool `auto` is what it means here."""

    class Unasked:
        address = "tcp://head:8786"

        def resolve_auto(self, device, dtype):  # noqa: ANN001, ANN202
            raise AssertionError("asked the workers")

    explicit = _cfg(tmp_path, tiny_models["llama"], dtype="bfloat16")
    assert pin_dtype(explicit, Unasked()) is explicit
    assert pin_dtype(_cfg(tmp_path, tiny_models["llama"])).model.dtype == HERE  # local: this process decides


def test_merging_the_workers_answers():
    """Agreeing answers give their dtype; disagreeing ones a one-line error listing each kind of worker; none (a
    scheduler without workers) says to set the dtype."""
    cpu = {"device": "cpu", "dtype": "float32", "host": "a", "pid": 1}
    gpu = {"device": "cuda", "dtype": "bfloat16", "host": "b", "pid": 2}
    assert agreed_dtype({"tcp://a:1": cpu, "tcp://a:2": cpu}) == "float32"
    assert agreed_dtype({"tcp://b:1": gpu}) == "bfloat16"
    with pytest.raises(DeviceError) as err:
        agreed_dtype({"tcp://b:1": gpu, "tcp://a:1": cpu, "tcp://a:2": cpu})
    assert str(err.value) == ("config error: model.dtype: auto resolves differently on the Dask workers (bfloat16 on "
                              "cuda at tcp://b:1; float32 on cpu at tcp://a:1, tcp://a:2); set model.dtype explicitly "
                              "(float32, bfloat16 or float16)")
    with pytest.raises(DeviceError, match=r"^config error: model.dtype: auto, but the Dask scheduler has no workers"):
        agreed_dtype({})
