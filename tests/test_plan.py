"""Tests for loralens.lens.memory.training_plan and `loralens plan`: exact counts, and planned vs measured memory."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import Tensor

from loralens.lens.lenses.lens_set import FoldedUnembed, LensConfig
from loralens.lens.lenses.objective import LensBatch, LensSet
from loralens.lens.memory.probe import LiveBytes
from loralens.lens.memory.training_plan import PlanError, plan_memory
from loralens.lens.runtime.adapters import ModelDims

LLAMA3_V, LLAMA3_D = 128256, 4096


@pytest.fixture
def llama3_config(tmp_path):
    """Meta-Llama-3-8B's published config.json, typed in (no download)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    path = tmp_path / "config.json"
    cfg.to_json_file(path)
    return path


def _plan_values(out: str) -> dict[tuple[str, str], int]:
    """Return {(section, item): value} parsed from the printed plan table."""
    values = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 3 and cells[2].isdigit():
            values[(cells[0], cells[1])] = int(cells[2])
    return values


def main(argv: list[str]) -> int:
    """Run the `loralens` CLI (imported here: the memory tests need none of the flow stack)."""
    from loralens.flows.cli import main as cli_main

    return cli_main(argv)


def _run_plan(capsys, *argv: str) -> dict[tuple[str, str], int]:
    assert main(["plan", *argv]) == 0
    return _plan_values(capsys.readouterr().out)


def test_cli_llama3_lora_counts(capsys, llama3_config):
    v = _run_plan(capsys, "--model", str(llama3_config), "--rank", "8", "--alpha", "16")
    per_head = 8 * LLAMA3_D + LLAMA3_V * 8 + LLAMA3_V
    assert v[("parameters", "per head")] == per_head == 1_187_072
    assert v[("parameters", "per layer")] == 32 * per_head
    assert v[("parameters", "total")] == 32 * 32 * per_head
    assert v[("cache", "z per token")] == 32 * (32 * 128 * 2 + 8)
    assert v[("cache", "target per token")] == LLAMA3_D * 4 + 4  # exact loss: h_final and scale only
    v = _run_plan(capsys, "--model", str(llama3_config), "--loss", "subset")
    assert v[("cache", "target per token")] == LLAMA3_D * 4 + 64 * 8 + 8  # + top-k ids, log-probs, lse


def test_cli_llama3_full_and_residual_counts(capsys, llama3_config):
    v = _run_plan(capsys, "--model", str(llama3_config), "--form", "full")
    assert v[("parameters", "per head")] == LLAMA3_V * LLAMA3_D + LLAMA3_V
    v = _run_plan(capsys, "--model", str(llama3_config.parent), "--form", "residual", "--rank", "4",
                  "--layers", "2", "--loss", "exact")
    assert v[("parameters", "per head")] == 2 * 4 * LLAMA3_D + LLAMA3_V
    assert v[("parameters", "total")] == 2 * 32 * (2 * 4 * LLAMA3_D + LLAMA3_V)
    assert v[("frozen", "lm_head (exact loss)")] == LLAMA3_V * LLAMA3_D * 4


def test_cli_errors_are_one_line(capsys, tmp_path, llama3_config, monkeypatch):
    import huggingface_hub.constants

    assert main(["plan", "--model", str(llama3_config), "--layers", "33"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "layers trained must be in [1, 32]" in err
    assert main(["plan", "--model", str(llama3_config), "--rank", "0"]) == 2
    assert "train.rank: Input should be greater than 0" in capsys.readouterr().err  # the config key it sets
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    assert main(["plan", "--model", str(bad)]) == 2
    assert "model_type" in capsys.readouterr().err
    # Offline (forced, so the test never waits on retries) a hub id cannot be resolved.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["plan", "--model", "no-such-org/no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot read the config of 'no-such-org/no-such-model'" in err


def test_zero_partitioning():
    dims = ModelDims(n_layers=4, n_heads=2, d_head=8, d_model=16, vocab=100)
    lens = LensConfig(form="lora", rank=2, alpha=4.0)
    P = plan_memory(dims, lens, micro_batch_tokens=8).params_total
    stage = {z: plan_memory(dims, lens, micro_batch_tokens=8, world_size=4, zero_stage=z) for z in range(4)}
    assert (stage[0].param_bytes, stage[0].grad_bytes, stage[0].optimizer_bytes) == (4 * P, 4 * P, 8 * P)
    assert (stage[1].param_bytes, stage[1].grad_bytes, stage[1].optimizer_bytes) == (4 * P, 4 * P, 3 * P)
    assert (stage[2].param_bytes, stage[2].grad_bytes, stage[2].optimizer_bytes) == (4 * P, P, 3 * P)
    assert (stage[3].param_bytes, stage[3].grad_bytes, stage[3].optimizer_bytes) == (P, P, 3 * P)
    bf16 = plan_memory(dims, LensConfig(dtype="bfloat16"), micro_batch_tokens=8, zero_stage=2)
    assert bf16.optimizer_bytes == 12 * bf16.params_total  # fp32 master + 2 states beside bf16 params
    with pytest.raises(PlanError, match="loss"):
        plan_memory(dims, lens, micro_batch_tokens=8, loss="mse")


@pytest.mark.parametrize("k", [16, 0])  # 0: an exact-loss cache stores no top-k nor log-sum-exp
def test_cache_bytes_match_cache_writer(k):
    """The planned per-token cache bytes are what the cache's Arrow tables hold, column for column."""
    from loralens.warehouse.activation_cache import tokens_table, z_table

    dims = ModelDims(n_layers=3, n_heads=4, d_head=8, d_model=24, vocab=500)
    n = 37
    plan = plan_memory(dims, LensConfig(), micro_batch_tokens=8, top_k=k, n_layers_trained=2,
                       loss="subset" if k else "exact")
    i32 = np.zeros(n, dtype=np.int32)
    cols = {"prompt_idx": i32, "position": i32, "token_id": i32, "next_token_id": i32,
            "scale": np.ones(n, np.float32), "lse": np.ones(n, np.float32),
            "topk_ids": np.zeros((n, k), np.int32), "topk_logprobs": np.zeros((n, k), np.float32),
            "h_final": np.zeros((n, dims.d_model), np.float32)}
    assert tokens_table(0, cols).nbytes == n * (plan.cache_target_bytes_per_token + plan.cache_meta_bytes_per_token)
    z = np.zeros((n, dims.z_width), np.uint16)
    assert 2 * z_table(0, z).nbytes == n * plan.cache_z_bytes_per_token


# -- planned vs measured memory (measured with loralens.lens.memory.probe.LiveBytes) ----------------
def _tiny(form: str, objective: str, loss: str, tokens: int, chunk: int, d=128, vocab=5000, heads=4, d_head=32,
          layers=3, k=64) -> tuple[LensSet, LensBatch, ModelDims]:
    """Return a random LensSet, one micro-batch for it and its dims."""
    g = torch.Generator().manual_seed(0)
    unembed = FoldedUnembed(torch.randn(vocab, d, generator=g) / d**0.5, torch.randn(vocab, generator=g))
    w_o = torch.randn(layers, heads, d_head, d, generator=g) / d**0.5
    lm_head = torch.randn(vocab, d, generator=g) / d**0.5
    config = LensConfig(form=form, rank=4, alpha=8.0, objective=objective)
    lens_set = LensSet(unembed, w_o, list(range(layers)), config, lm_head=lm_head if loss == "exact" else None,
                       loss=loss, chunk=chunk)
    h = torch.randn(tokens, d, generator=g)
    top = torch.log_softmax(h @ lm_head.T, -1).topk(k, -1)
    batch = LensBatch(z=torch.randn(tokens, layers, heads * d_head, generator=g).half(),
                      scale=1 + torch.rand(tokens, generator=g), mask=torch.ones(tokens, dtype=torch.bool))
    if loss == "exact":
        batch.h_final = h
    else:
        batch.topk_ids, batch.topk_logprobs = top.indices, top.values
    return lens_set, batch, ModelDims(n_layers=layers, n_heads=heads, d_head=d_head, d_model=d, vocab=vocab)


def _nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors if isinstance(t, Tensor))


def _measure_step(lens_set: LensSet, batch: LensBatch) -> dict[str, int]:
    """Return measured bytes of one training step (forward + backward + AdamW step) after a warm-up step."""
    params = [p for p in lens_set.parameters() if p.requires_grad]
    # foreach: the GPU default implementation, whose step temporaries the plan models (CPU defaults to a loop).
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)

    def step() -> None:
        lens_set(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer states, as every step but the first sees them
    resident = (_nbytes(params) + _nbytes(lens_set.buffers()) + _nbytes(batch.__dict__.values())
                + _nbytes(v for s in opt.state.values() for v in s.values()))
    tracker = LiveBytes()
    with tracker:
        lens_set(batch).backward()
        backward_end = len(tracker.log)
        grad_recs = {tracker.live[p.grad.untyped_storage().data_ptr()] for p in params}
        grads = _nbytes(p.grad for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)
    states = _nbytes(v for s in opt.state.values() for v in s.values())
    return {
        "state": _nbytes(params) + grads + states,
        "frozen": _nbytes(lens_set.buffers()),
        "activations": tracker.peak(0, backward_end, skip=grad_recs),
        "step_transient": tracker.peak(backward_end),
        "peak": resident + tracker.peak(),
    }


@pytest.mark.parametrize(
    ("form", "objective", "loss", "tokens", "chunk"),
    [
        ("lora", "joint", "subset", 256, 256),
        ("lora", "per_head", "subset", 256, 256),
        ("full", "joint", "subset", 256, 256),
        ("lora", "joint", "exact", 256, 256),
        ("residual", "joint", "subset", 256, 128),
        ("full", "joint", "exact", 256, 64),
    ],
)
def test_planned_memory_matches_measured(form, objective, loss, tokens, chunk):
    lens_set, batch, dims = _tiny(form, objective, loss, tokens, chunk)
    plan = plan_memory(dims, lens_set.config, micro_batch_tokens=tokens, loss=loss, chunk=chunk, top_k=64,
                       zero_stage=0)  # a plain torch AdamW, as measured here
    assert plan.params_total == sum(p.numel() for p in lens_set.parameters() if p.requires_grad)
    measured = _measure_step(lens_set, batch)
    assert plan.frozen_bytes == measured["frozen"]
    assert plan.state_bytes == pytest.approx(measured["state"], rel=1e-3)  # + AdamW's scalar step counters
    assert plan.activation_bytes == pytest.approx(measured["activations"], rel=0.25)
    assert plan.step_transient_bytes == pytest.approx(measured["step_transient"], rel=0.25)
    assert plan.peak_bytes == pytest.approx(measured["peak"], rel=0.25)


@pytest.mark.parametrize(("objective", "base_rows"), [("joint", 256), ("per_head", 64)])
def test_planned_memory_of_the_fused_loss_matches_measured(objective, base_rows):
    """Enough layers that the fused loss's held gradients and inputs, not the target, make the peak. Joint holds a
    layer's fp32 base `[tokens, vocab]` in its forward, per_head one head's `[chunk, vocab]` at a time."""
    lens_set, batch, dims = _tiny("lora", objective, "exact", tokens=256, chunk=64, layers=24)
    assert lens_set.uses_fused(256)
    plan = plan_memory(dims, lens_set.config, micro_batch_tokens=256, loss="exact", chunk=64, top_k=64, zero_stage=0)
    assert plan.act_held_grad_bytes > 0 and plan.act_base_bytes == base_rows * dims.vocab * 4
    assert plan.activation_bytes > (21 * plan.act_targets_bytes) // 4  # not the target's making
    measured = _measure_step(lens_set, batch)
    assert plan.activation_bytes == pytest.approx(measured["activations"], rel=0.25)
    assert plan.peak_bytes == pytest.approx(measured["peak"], rel=0.25)


@pytest.mark.parametrize(("form", "loss", "chunk"), [("full", "exact", 64), ("lora", "exact", 64)])
def test_planned_activations_of_bf16_lenses_match_measured(form, loss, chunk):
    """bf16 parameters: each chunk computes with fp32 copies of its layer's weights, and the chunks' gradients are
    summed in fp32 (loralens.lens.lenses.upcast); the plan counts both."""
    lens_set, batch, dims = _tiny(form, "joint", loss, 256, chunk)
    for p in lens_set.parameters():
        p.data = p.data.bfloat16()
    lens = LensConfig(form=form, rank=4, alpha=8.0, dtype="bfloat16")
    # ZeRO-2 (bf16 needs it); its fp32 state is not what a plain torch AdamW allocates, so only activations compare
    plan = plan_memory(dims, lens, micro_batch_tokens=256, loss=loss, chunk=chunk, top_k=64, zero_stage=2)
    assert plan.act_upcast_bytes == 4 * plan.params_per_layer
    assert plan.act_grad_accum_bytes == 3 * 4 * plan.params_per_layer  # 4 chunks summed in fp32
    assert plan.activation_bytes == pytest.approx(_measure_step(lens_set, batch)["activations"], rel=0.25)
