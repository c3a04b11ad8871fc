"""Per-head capture and the folded unembedding, on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch

from loralens.lens.heads.hooks import capture, head_contributions
from loralens.lens.runtime.adapters import (
    UnsupportedArchitectureError,
    adapter_for,
    folded_unembedding,
    norm_scale,
    out_proj_bias,
    out_proj_weight,
)
from loralens.lens.runtime.models import load_model
from tests.conftest import FAMILIES

PROMPTS = ["The quick brown fox jumps over", "A short one", "Robert is an English film actor and he"]


@pytest.mark.parametrize("family", FAMILIES)
def test_head_contributions_sum_to_attention_output(family, tiny_models, tmp_path):
    loaded = load_model(str(tiny_models[family]), tmp_path)
    model, adapter, dims = loaded.model, loaded.adapter, loaded.dims
    enc = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    layers = range(dims.n_layers)
    with torch.no_grad(), capture(model, adapter, layers, attn_out=True) as cap:
        model(**enc)
    for layer in layers:
        w_o = out_proj_weight(adapter, model, layer, dims)
        contrib = head_contributions(cap.z[layer], w_o)  # [batch, pos, heads, d_model]
        assert contrib.shape == (*enc["input_ids"].shape, dims.n_heads, dims.d_model)
        bias = out_proj_bias(adapter, model, layer)
        total = contrib.sum(-2) + (0 if bias is None else bias)
        torch.testing.assert_close(total, cap.attn_out[layer], atol=1e-5, rtol=1e-4)
        # every head matters: dropping one breaks the identity
        assert (total - contrib[..., 0, :] - cap.attn_out[layer]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_unembedding_reproduces_logits(family, tiny_models, tmp_path):
    loaded = load_model(str(tiny_models[family]), tmp_path)
    model, adapter = loaded.model, loaded.adapter
    enc = loaded.tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad(), capture(model, adapter, []) as cap:
        logits = model(**enc).logits
    w, b = folded_unembedding(adapter, model)
    x = cap.final_resid
    folded = (x / norm_scale(adapter, model, x)) @ w.T + b
    torch.testing.assert_close(folded, logits, atol=1e-4, rtol=1e-4)


def test_gqa_and_wide_heads_dims(tiny_models, tmp_path):
    qwen3 = load_model(str(tiny_models["qwen3"]), tmp_path).dims
    assert (qwen3.n_heads, qwen3.d_head, qwen3.d_model, qwen3.z_width) == (4, 24, 64, 96)
    llama = load_model(str(tiny_models["llama"]), tmp_path).dims
    assert llama.z_width == llama.d_model == 64


def test_unsupported_architecture_lists_families():
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'bert'.*gpt2.*llama"):
        adapter_for("bert")


def test_hooks_are_removed(tiny_models, tmp_path):
    loaded = load_model(str(tiny_models["gpt2"]), tmp_path)
    proj = loaded.adapter.out_proj(loaded.model, 0)
    with capture(loaded.model, loaded.adapter, [0, 1], attn_out=True):
        assert proj._forward_pre_hooks and proj._forward_hooks
    assert not proj._forward_pre_hooks and not proj._forward_hooks
