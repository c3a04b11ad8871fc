"""The memory check per device: host parts against RAM, each GPU's parts against that GPU's free memory.

Real configs (`parse_config`) and the real predictions (`tasks.memory.predict`) of the tiny llama; the free memory
of each device is injected (no GPU here), through the same `check_fits` every stage runs.
"""

from __future__ import annotations

import pytest

from loralens.config import parse_config
from loralens.lens.memory.stage_memory import HOST, MemoryBudgetError, check_fits, gib, parts_by_device
from loralens.tasks.memory import on_workers, predict, stage_gpus
from tests.test_intervene import config


@pytest.fixture(autouse=True)
def _no_limit(monkeypatch):
    monkeypatch.delenv("LORALENS_MEMORY_LIMIT", raising=False)  # the injected host size is the one checked


def _cfg(tmp_path, model, **train):
    raw = config(tmp_path / "home", model)
    raw["model"] = {**raw["model"], "device": "cpu", "dtype": "float32"}  # predictions are device-independent here
    raw["train"] = {**raw["train"], **train}
    return parse_config(raw)


def test_stage_gpus_places_each_process():
    """A CPU run or a device_map has no GPU places; one process computes on its device; ranks and local workers
    take GPU i, cycling."""
    assert stage_gpus("cpu", 4, 0) == ()
    assert stage_gpus("cuda:0", 1, 2, device_map="auto") == ()
    assert stage_gpus("cuda:1", 1, 2) == ("cuda:1",)
    assert stage_gpus("cuda:0", 3, 2) == ("cuda:0", "cuda:1", "cuda:0")


def test_cpu_run_puts_every_part_on_the_host(tiny_models, tmp_path):
    """Without GPUs every part of every process is host memory, and the check is the one before devices."""
    cfg = _cfg(tmp_path, tiny_models["llama"], world_size=2)
    for stage in ("cache", "train", "eval", "decode", "attribute", "select", "intervene"):
        mem = predict(cfg, stage)
        assert parts_by_device(mem) == {HOST: mem.total}
    mem = predict(cfg, "train")
    check_fits(mem, available=mem.total)
    with pytest.raises(MemoryBudgetError) as err:
        check_fits(mem, available=mem.total - 1)
    assert str(err.value).startswith(f"train stage will not fit in memory: predicted peak {gib(mem.total)} "
                                     f"(2 processes x {gib(mem.per_process)}), available ")
    assert "cuda" not in str(err.value) and "\n" not in str(err.value)


def test_gpu_parts_over_the_gpus_free_memory_name_the_gpu(tiny_models, tmp_path):
    """Weights, lens states and activations on cuda:0 exceed its free memory while the host has room: the error
    names cuda:0 and its free memory; the same prediction fits a GPU with room, though all of it together exceeds
    the host RAM (which a host-only check would have refused)."""
    cfg = _cfg(tmp_path, tiny_models["llama"])
    mem = predict(cfg, "train")
    gpus = stage_gpus("cuda:0", mem.processes, 1)
    needed = parts_by_device(mem, gpus)
    on_gpu = sum(b for name, b in mem.parts if name in mem.gpu_parts)
    assert needed == {HOST: mem.total - on_gpu, "cuda:0": on_gpu} and 0 < on_gpu < mem.total
    host = needed[HOST] + 1  # room for the host parts, not for the whole stage
    with pytest.raises(MemoryBudgetError) as err:
        check_fits(mem, available=host, gpus=gpus, gpu_free={"cuda:0": on_gpu - 1})
    assert str(err.value) == (f"train stage will not fit in memory on cuda:0: predicted peak {gib(on_gpu)}, "
                              f"{gib(on_gpu - 1)} free there; to fit, lower {mem.shrink}")
    check_fits(mem, available=host, gpus=gpus, gpu_free={"cuda:0": on_gpu})
    with pytest.raises(MemoryBudgetError, match="^train stage will not fit in memory: "):
        check_fits(mem, available=host)  # a CPU run of the same stage: all of it on the host


def test_host_parts_over_ram_name_the_host(tiny_models, tmp_path):
    """On a GPU run the host parts (runtime, the cache shard) alone exceed the RAM: the error is the host's."""
    cfg = _cfg(tmp_path, tiny_models["llama"])
    mem = predict(cfg, "train")
    gpus = stage_gpus("cuda:0", 1, 1)
    host = parts_by_device(mem, gpus)[HOST]
    with pytest.raises(MemoryBudgetError) as err:
        check_fits(mem, available=host - 1, gpus=gpus, gpu_free={"cuda:0": mem.total})
    assert str(err.value).startswith(f"train stage will not fit in memory: predicted peak {gib(host)}, available "
                                     f"{gib(host - 1)} on the host; to fit, lower train.micro_batch_tokens")
    assert "cuda" not in str(err.value)


def test_eight_ranks_fit_on_eight_gpus_though_all_exceed_the_host(tiny_models, tmp_path):
    """world_size 8 on one node: each rank's GPU share on its own GPU fits, while all 8 ranks' peaks together
    exceed the host RAM; on 4 GPUs (two ranks each) a GPU is short, in one line counting its ranks."""
    cfg = _cfg(tmp_path, tiny_models["llama"], world_size=8)
    mem = predict(cfg, "train")
    assert mem.processes == 8
    share = sum(b for name, b in mem.parts if name in mem.gpu_parts)
    gpus = stage_gpus("cuda:0", mem.processes, 8)
    needed = parts_by_device(mem, gpus)
    assert needed == {HOST: mem.total - 8 * share, **{f"cuda:{i}": share for i in range(8)}}
    host = needed[HOST]
    assert host < mem.total
    check_fits(mem, available=host, gpus=gpus, gpu_free={g: share for g in gpus})
    with pytest.raises(MemoryBudgetError) as err:
        check_fits(mem, available=host)
    assert "8 processes x" in str(err.value)
    four = stage_gpus("cuda:0", mem.processes, 4)
    with pytest.raises(MemoryBudgetError) as err:
        check_fits(mem, available=host, gpus=four, gpu_free={g: 2 * share - 1 for g in four})
    assert str(err.value).startswith(f"train stage will not fit in memory on cuda:0: predicted peak {gib(2 * share)} "
                                     f"(2 processes x {gib(share)}), {gib(2 * share - 1)} free there; ")


def test_local_dask_workers_each_hold_their_model_on_their_gpu(tiny_models, tmp_path):
    """A split stage on 2 local workers with 2 GPUs: one model copy per GPU, both host runtimes on the host."""
    cfg = _cfg(tmp_path, tiny_models["llama"])
    mem = on_workers(predict(cfg, "cache"), 2)
    one_gpu = sum(b for name, b in mem.parts if name in mem.gpu_parts)
    assert "model weights" in mem.gpu_parts and "runtime" not in mem.gpu_parts
    needed = parts_by_device(mem, stage_gpus("cuda:0", mem.processes, 2))
    assert needed == {HOST: mem.total - 2 * one_gpu, "cuda:0": one_gpu, "cuda:1": one_gpu}
