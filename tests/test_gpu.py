"""Device-sensitive paths on a GPU (marked `gpu`; skipped where CUDA is absent, so CI on CPUs skips them).

Run on a GPU machine: `pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loralens.warehouse.constants import STAGES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_zero_ablation_on_cuda_equals_cpu(tiny_models, tmp_path):
    from loralens.lens.heads.edits import HeadIntervention, intervene
    from loralens.lens.runtime.models import load_model

    ids = torch.randint(0, 200, (2, 12))
    out = {}
    for device in ("cpu", "cuda"):
        loaded = load_model(str(tiny_models["llama"]), tmp_path, device=device)
        with intervene(loaded.model, loaded.adapter, HeadIntervention("zero", ((1, 2), (0, 1))), loaded.dims):
            out[device] = loaded.model(input_ids=ids.to(device)).logits.float().cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-3, atol=1e-3)


def tiny_cuda_config(home: Path, model: Path, overrides: dict[str, dict] | None = None) -> dict:
    """Return the tiny whole-pipeline config on cuda (dtype auto = bf16 there): 16 prompts of 16 tokens in shards
    of 8, one epoch, a reduced select and intervene; `overrides` ({section: {key: value}}) merged into it."""
    config = {
        "home": str(home), "model": {"name": str(model), "device": "cuda"},
        "corpus": {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"], "max_prompts_per_file": 8},
        "cache": {"batch_size": 4, "prompts_per_shard": 8, "max_length": 16},
        "train": {"micro_batch_tokens": 32, "epochs": 1},
        "select": {"max_prompts": 4, "batch_prompts": 4, "candidates": 2, "k": 2},
        "intervene": {"max_prompts": 4, "k": 2, "max_new_tokens": 4, "ppl_tokens": 100, "ppl_window": 50,
                      "head_sets": [{"top_n": 1}], "ablation_candidates": 0, "n_boot": 20},
    }
    for section, values in (overrides or {}).items():
        config[section] = {**config.get(section, {}), **values}
    return config


def needs_gpus(n: int) -> pytest.MarkDecorator:
    """Skip a test on a machine with fewer than `n` CUDA devices."""
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs")


def run_stages(config: dict, stages: tuple[str, ...]) -> dict:
    """Run the pipeline's `stages` one by one (`loralens run --only STAGE`); return each stage's summary."""
    from loralens.flows.pipeline import pipeline

    return {stage: pipeline(config=config, only=stage)[stage] for stage in stages}


def saved_lens_dtypes(home: Path) -> set[torch.dtype]:
    """Return the dtypes of every lens tensor the train stage saved under `home`."""
    from safetensors import safe_open

    files = sorted(home.glob("artifacts/train/*/lenses/**/*.safetensors"))
    assert files, f"no saved lenses under {home}"
    dtypes = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            dtypes |= {st.get_tensor(k).dtype for k in st.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return dtypes


def visible_devices() -> str | None:
    """Return this process's CUDA_VISIBLE_DEVICES (run on each Dask worker)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def n_heads(model: Path) -> int:
    from transformers import AutoConfig

    dims = AutoConfig.from_pretrained(model)
    return dims.num_hidden_layers * dims.num_attention_heads


def test_every_stage_on_cuda_in_bf16(prefect_server, tiny_models, tmp_path):
    """The whole pipeline with model.device cuda (dtype auto = bf16 there): every stage completes on the GPU."""
    from loralens.flows.pipeline import pipeline

    results = pipeline(config=tiny_cuda_config(tmp_path, tiny_models["llama"]))
    assert set(results) == set(STAGES)
    assert results["train"]["steps"] > 0 and results["train"]["held_out_tokens"] > 0
    heads = n_heads(tiny_models["llama"])
    assert results["decode"]["rows"] > 0 and results["attribute"]["heads"] == results["select"]["heads"] == heads
    assert results["intervene"]["generations"] > 0


@needs_gpus(2)
def test_two_ranks_train_bf16_lenses_at_zero2(prefect_server, tiny_models, tmp_path):
    """2 training ranks (torchrun, NCCL), ZeRO-2, bf16 lens parameters: each rank gets its own cache shard, the
    lenses saved are the fp32 masters, and decode reads them."""
    config = tiny_cuda_config(tmp_path, tiny_models["llama"], {
        "cache": {"prompts_per_shard": 4}, "train": {"world_size": 2, "zero_stage": 2, "param_dtype": "bfloat16"}})
    results = run_stages(config, ("cache", "train", "decode"))
    assert results["train"]["world_size"] == 2 and results["train"]["steps"] > 0
    assert results["train"]["held_out_tokens"] > 0
    assert saved_lens_dtypes(tmp_path) == {torch.float32}
    assert results["decode"]["rows"] > 0


def test_zero3_trains_bf16_lenses(prefect_server, tiny_models, tmp_path):
    """ZeRO-3 with bf16 lens parameters, one rank per GPU (two where there are two): the parameters are
    partitioned, the saved lenses are the gathered fp32 masters, and decode reads them."""
    world = min(torch.cuda.device_count(), 2)
    config = tiny_cuda_config(tmp_path, tiny_models["llama"], {
        "cache": {"prompts_per_shard": 4}, "train": {"world_size": world, "zero_stage": 3, "param_dtype": "bfloat16"}})
    results = run_stages(config, ("cache", "train", "decode"))
    assert results["train"]["world_size"] == world and results["train"]["steps"] > 0
    assert saved_lens_dtypes(tmp_path) == {torch.float32}
    assert results["decode"]["rows"] > 0


@needs_gpus(2)
def test_device_map_auto_spreads_the_model_through_cache_select_and_intervene(prefect_server, tiny_models, tmp_path):
    """model.device_map auto on 2+ GPUs: the model really spreads over several GPUs (accelerate's hooks move each
    layer's inputs), and cache, select (per-head replay) and intervene (mean-z head edits) complete on it."""
    from loralens.lens.runtime.models import load_model

    loaded = load_model(str(tiny_models["llama"]), tmp_path / "load", dtype="bfloat16", device="cuda:0",
                        device_map="auto")
    assert len(set(loaded.model.hf_device_map.values())) > 1  # else this test would not cover the spread path
    del loaded
    config = tiny_cuda_config(tmp_path, tiny_models["llama"], {
        "model": {"device_map": "auto"}, "intervene": {"kind": "mean", "mean_tokens": 256}})  # mean z: per layer
    results = run_stages(config, STAGES)
    assert results["cache"]["n_tokens"] > 0
    assert results["select"]["heads"] == n_heads(tiny_models["llama"])
    assert results["intervene"]["generations"] > 0


@needs_gpus(2)
def test_two_dask_workers_on_two_gpus(prefect_server, tiny_models, tmp_path):
    """run.workers 2 on a GPU machine: each local Dask worker sees its own GPU, and every stage completes with the
    cache shards, decode shards and generation units split over the two."""
    from loralens.config import parse_config
    from loralens.flows.dask_workers import WorkerPool

    config = tiny_cuda_config(tmp_path, tiny_models["llama"], {
        "run": {"workers": 2}, "intervene": {"batch_prompts": 2}})
    pool = WorkerPool(2, None, parse_config(config))
    try:
        seen = pool.runner().client.run(visible_devices)
    finally:
        pool.close()
    assert sorted(seen.values()) == ["0", "1"]
    results = run_stages(config, STAGES)
    assert results["cache"]["n_tokens"] > 0 and results["decode"]["rows"] > 0
    assert results["intervene"]["generations"] > 0
