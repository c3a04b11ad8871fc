"""Device-sensitive paths on a GPU (marked `gpu`; skipped where CUDA is absent, so CI on CPUs skips them).

Run on a GPU machine: `pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

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


def test_every_stage_on_cuda_in_bf16(prefect_server, tiny_models, tmp_path):
    """The whole pipeline with model.device cuda (dtype auto = bf16 there): every stage completes on the GPU."""
    from loralens.flows.pipeline import pipeline

    config = {
        "home": str(tmp_path), "model": {"name": str(tiny_models["llama"]), "device": "cuda"},
        "corpus": {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"], "max_prompts_per_file": 8},
        "cache": {"batch_size": 4, "prompts_per_shard": 8, "max_length": 16},
        "train": {"micro_batch_tokens": 32, "epochs": 1},
        "select": {"max_prompts": 4, "batch_prompts": 4, "candidates": 2, "k": 2},
        "intervene": {"max_prompts": 4, "k": 2, "max_new_tokens": 4, "ppl_tokens": 100, "ppl_window": 50,
                      "head_sets": [{"top_n": 1}], "ablation_candidates": 0, "n_boot": 20},
    }
    results = pipeline(config=config)
    assert set(results) == set(STAGES)
    assert results["train"]["steps"] > 0 and results["train"]["held_out_tokens"] > 0
    from transformers import AutoConfig

    dims = AutoConfig.from_pretrained(tiny_models["llama"])
    n_heads = dims.num_hidden_layers * dims.num_attention_heads
    assert results["decode"]["rows"] > 0 and results["attribute"]["heads"] == results["select"]["heads"] == n_heads
    assert results["intervene"]["generations"] > 0
