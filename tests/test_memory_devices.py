"""The memory check per device: host parts against RAM, each GPU's parts against that GPU's free memory.

Real configs (`parse_config`) and the real predictions (`tasks.memory.predict`) of the tiny llama; the free memory
of each device is injected (no GPU here), through the same `check_fits` every stage runs.
"""

from __future__ import annotations

import pytest

from loralens.config import parse_config
from loralens.lens.memory.stage_memory import (
    HOST,
    MemoryBudgetError,
    StageMemory,
    check_fits,
    gib,
    intervene_memory,
    parts_by_device,
    spread_by_device,
)
from loralens.lens.runtime.adapters import ModelDims
from loralens.tasks.memory import on_workers, predict, spreads, stage_gpus
from tests.test_intervene import config

# Meta-Llama-3-8B's published shape (config.json) and parameter count; 24 GB GPUs
LLAMA3_8B = ModelDims(n_layers=32, n_heads=32, d_head=128, d_model=4096, vocab=128256)
LLAMA3_8B_PARAMS, LLAMA3_8B_KV_HEADS = 8_030_261_248, 8
GPU_24GB = 24 * 2**30


@pytest.fixture(autouse=True)
def _no_limit(monkeypatch):
    monkeypatch.delenv("LORALENS_MEMORY_LIMIT", raising=False)  # the injected host size is the one checked


def _cfg(tmp_path, model, **train):
    raw = config(tmp_path / "home", model)
    raw["model"] = {**raw["model"], "device": "cpu", "dtype": "float32"}  # predictions are device-independent here
    raw["train"] = {**raw["train"], **train}
    return parse_config(raw)


def test_stage_gpus_places_each_process():
    """A CPU run has no GPU places; one process computes on its device; ranks and local workers take GPU i,
    cycling; a model spread by a device_map is on every visible GPU."""
    assert stage_gpus("cpu", 4, 0) == ()
    assert stage_gpus("cpu", 1, 0, spread=True) == ()
    assert stage_gpus("cuda:0", 1, 2, spread=True) == ("cuda:0", "cuda:1")
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


def test_device_map_spreads_only_a_full_model_stage_on_gpus_in_one_process():
    """device_map spreads cache, select and intervene's model on a GPU run of one process; not on a CPU (the host
    check as before), not train or decode (lean models on the process's GPU), not local Dask workers (one GPU each)."""
    assert all(spreads("cuda:0", stage, 1, "auto") for stage in ("cache", "select", "intervene"))
    assert not spreads("cuda:0", "intervene", 1, None)
    assert not spreads("cpu", "intervene", 1, "auto")
    assert not any(spreads("cuda:0", stage, 1, "auto") for stage in ("train", "eval", "decode", "attribute"))
    assert not spreads("cuda:0", "cache", 2, "auto")


def _llama3_8b_intervene() -> StageMemory:
    """The intervene stage of Llama-3-8B in float32 (an fp32 checkpoint: ~30 GB of weights), default settings."""
    return intervene_memory(LLAMA3_8B, n_params=LLAMA3_8B_PARAMS, model_dtype="float32", batch_prompts=8, k=4,
                            tokens=64 + 20, n_layers_total=32, n_kv_heads=LLAMA3_8B_KV_HEADS, ppl_window=256)


def test_8b_spread_over_two_24gb_gpus_fits_with_a_small_host():
    """An 8B model larger than one 24 GB GPU, spread by device_map over two: weights and KV cache split in half, the
    logits whole on each GPU, the runtime alone on a 2 GB host; the host-only check of before refused it."""
    mem = _llama3_8b_intervene()
    weights = dict(mem.parts)["model weights"]
    assert weights > GPU_24GB
    gpus = stage_gpus("cuda:0", 1, 2, spread=True)
    needed = spread_by_device(mem, gpus)
    split = weights + dict(mem.parts)["KV cache"]
    whole = sum(b for name, b in mem.parts if name in mem.gpu_parts) - split
    assert needed == {HOST: dict(mem.parts)["runtime"], "cuda:0": -(-split // 2) + whole,
                      "cuda:1": -(-split // 2) + whole}
    check_fits(mem, available=2 * 2**30, gpus=gpus, gpu_free={g: GPU_24GB for g in gpus}, spread=True)
    with pytest.raises(MemoryBudgetError, match="^intervene stage will not fit in memory: "):
        check_fits(mem, available=2 * 2**30)  # the check before: every part against host RAM


def test_8b_spread_over_one_24gb_gpu_names_cuda0():
    """The same model with device_map over a single 24 GB GPU: refused in one line naming cuda:0, its share and the
    settings to lower or more GPUs."""
    mem = _llama3_8b_intervene()
    gpus = stage_gpus("cuda:0", 1, 1, spread=True)
    need = spread_by_device(mem, gpus)["cuda:0"]
    with pytest.raises(MemoryBudgetError) as err:
        check_fits(mem, available=2 * 2**30, gpus=gpus, gpu_free={"cuda:0": GPU_24GB}, spread=True)
    assert str(err.value) == (f"intervene stage will not fit in memory on cuda:0: predicted peak {gib(need)} (its "
                              f"share of the model spread by model.device_map over 1 GPU(s)), {gib(GPU_24GB)} free "
                              f"there; to fit, lower {mem.shrink}, or make more GPUs visible (CUDA_VISIBLE_DEVICES, "
                              f"now 1)")


def test_8b_without_device_map_on_one_24gb_gpu_is_refused_as_before():
    """Without a device_map the model computes on cuda:0 alone: every GPU part there, refused naming cuda:0."""
    mem = _llama3_8b_intervene()
    gpus = stage_gpus("cuda:0", 1, 2)
    on_gpu = sum(b for name, b in mem.parts if name in mem.gpu_parts)
    assert parts_by_device(mem, gpus) == {HOST: mem.total - on_gpu, "cuda:0": on_gpu}
    with pytest.raises(MemoryBudgetError) as err:
        check_fits(mem, available=2 * 2**30, gpus=gpus, gpu_free={"cuda:0": GPU_24GB, "cuda:1": GPU_24GB})
    assert str(err.value) == (f"intervene stage will not fit in memory on cuda:0: predicted peak {gib(on_gpu)}, "
                              f"{gib(GPU_24GB)} free there; to fit, lower {mem.shrink}")


def test_ensure_fits_spreads_the_full_model_stages_of_a_device_map_config(tiny_models, tmp_path, monkeypatch):
    """`ensure_fits` on a (pretended) 2-GPU machine with model.device_map auto: intervene's model is spread over
    both GPUs; train's ranks stay on their GPU; a split stage on 2 local workers puts one model on each GPU."""
    import torch

    from loralens.config.inputs import ModelConfig
    from loralens.tasks import memory

    raw = config(tmp_path / "home", tiny_models["llama"])
    raw["model"] = {**raw["model"], "device": "cuda:0", "dtype": "float32", "device_map": "auto"}
    cfg = parse_config(raw)
    monkeypatch.setattr(ModelConfig, "torch_device", lambda self: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    calls = []
    monkeypatch.setattr(memory, "check_fits", lambda m, gpus, spread: calls.append((m.stage, gpus, spread)))
    memory.ensure_fits(cfg, "intervene")
    memory.ensure_fits(cfg, "train")
    memory.ensure_fits(cfg, "cache", workers=2)
    assert calls == [("intervene", ("cuda:0", "cuda:1"), True), ("train", ("cuda:0",), False),
                     ("eval", ("cuda:0",), False), ("cache", ("cuda:0", "cuda:1"), False)]
