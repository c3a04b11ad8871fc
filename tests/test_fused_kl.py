"""The fused joint lora exact loss (lens/lenses/fused_kl.py) against the checkpointed path it replaces."""

from __future__ import annotations

import pytest
import torch

from loralens.lens.lenses.fused_kl import fused_lora_kl, prefers_fused
from loralens.lens.lenses.lens_set import FoldedUnembed, LensConfig
from loralens.lens.lenses.losses import exact_target, kl_exact
from loralens.lens.lenses.objective import LensBatch, LensSet

D, V, H, DH, LAYERS, TOKENS = 48, 700, 3, 16, 2, 37


def _lens_set(fused: bool | None, base_dtype: str = "float32", chunk: int = 8, rank: int = 4,
              param_dtype: str = "float32", loss: str = "exact", objective: str = "joint") -> LensSet:
    """Return a LensSet over fixed random weights with non-zero lora_B and bias (so every gradient is live)."""
    g = torch.Generator().manual_seed(0)
    unembed = FoldedUnembed(torch.randn(V, D, generator=g) / D**0.5, torch.randn(V, generator=g))
    w_o = torch.randn(LAYERS, H, DH, D, generator=g) / DH**0.5
    lm_head = torch.randn(V, D, generator=g) / D**0.5
    config = LensConfig(form="lora", rank=rank, alpha=2.0 * rank, objective=objective, dtype=param_dtype)
    torch.manual_seed(1)  # lora_A's initialisation
    out = LensSet(unembed, w_o, list(range(LAYERS)), config, lm_head=lm_head, loss=loss, chunk=chunk,
                  base_dtype=base_dtype, fused=fused)
    with torch.no_grad():
        for bank in out.banks:
            bank.lora_B.normal_(0.0, 0.2)
            bank.bias.normal_(0.0, 0.3)
    return out


def _batch(mask: torch.Tensor | None = None) -> LensBatch:
    g = torch.Generator().manual_seed(2)
    return LensBatch(z=torch.randn(TOKENS, LAYERS, H * DH, generator=g).half(),
                     scale=0.8 + 0.4 * torch.rand(TOKENS, generator=g),
                     mask=torch.ones(TOKENS, dtype=torch.bool) if mask is None else mask,
                     h_final=torch.randn(TOKENS, D, generator=g))


def _loss_and_grads(lens_set: LensSet, batch: LensBatch) -> tuple[float, list[torch.Tensor]]:
    loss = lens_set(batch)
    loss.backward()
    return float(loss.detach()), [p.grad.float() for p in lens_set.parameters() if p.requires_grad]


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [8, 64])
def test_fused_loss_and_gradients_equal_the_checkpointed_path(base_dtype, chunk):
    mask = torch.ones(TOKENS, dtype=torch.bool)
    mask[5:9] = False  # padding rows weigh nothing in either path
    mask[16:24] = False  # a whole chunk of 8 is padding: skipped
    batch = _batch(mask)
    ref_loss, ref_grads = _loss_and_grads(_lens_set(False, base_dtype, chunk), batch)
    fused = _lens_set(True, base_dtype, chunk)
    assert fused.uses_fused(TOKENS)
    loss, grads = _loss_and_grads(fused, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert len(grads) == len(ref_grads) == 3 * LAYERS
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert want.abs().max() > 0


def test_fused_bf16_parameters_sum_chunks_in_fp32_and_round_once():
    """bf16 inputs: each gradient is the fp32 sum over all chunks rounded to bf16 once (chunk by chunk in bf16,
    autograd's accumulation in the leaf's dtype, it would differ)."""
    g = torch.Generator().manual_seed(4)
    n, hr, chunk = 64, 6, 4
    leaves = [t.bfloat16() for t in (torch.randn(n, hr, generator=g), torch.randn(V, hr, generator=g),
                                      torch.randn(V, generator=g))]
    base, target = torch.randn(n, V, generator=g), exact_target(torch.randn(n, V, generator=g))
    mask = torch.ones(n, dtype=torch.bool)

    def grads(dtype: torch.dtype, rows: slice = slice(None)) -> list[torch.Tensor]:
        args = [t.to(dtype, copy=True).requires_grad_() for t in leaves]
        m = torch.zeros(n, dtype=torch.bool)
        m[rows] = True
        fused_lora_kl(*args, base, target, mask & m, scale=0.5, chunk=chunk).backward()
        return [a.grad for a in args]

    got, exact = grads(torch.bfloat16), grads(torch.float32)
    for gb, gf in zip(got, exact, strict=True):
        assert gb.dtype == torch.bfloat16 and torch.equal(gb, gf.bfloat16())
    # what summing chunk by chunk in bf16 gives instead (each chunk weighted as in the full mean)
    per_chunk = [grads(torch.bfloat16, slice(s, s + chunk)) for s in range(0, n, chunk)]
    naive = [sum((c[i] / (n // chunk) for c in per_chunk[1:]), per_chunk[0][i] / (n // chunk)) for i in (1, 2)]
    assert any(not torch.equal(a, gb) for a, gb in zip(naive, got[1:], strict=True))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [8, 64])
def test_fused_per_head_loss_and_gradients_equal_the_checkpointed_path(chunk, param_dtype):
    """per_head: each head's lens alone against the model, mean over heads; the fused path makes each head's
    `[chunk, vocab]` block in turn from the bank's fp32 unembedding, as the checkpointed path's `head_logits` do."""
    mask = torch.ones(TOKENS, dtype=torch.bool)
    mask[5:9] = False
    mask[16:24] = False
    batch = _batch(mask)
    ref = _lens_set(False, "bfloat16", chunk, param_dtype=param_dtype, objective="per_head")
    fused = _lens_set(None, "bfloat16", chunk, param_dtype=param_dtype, objective="per_head")
    assert fused.uses_fused(TOKENS) and not ref.uses_fused(TOKENS)  # per_head: fused whatever the rank or tokens
    assert all(p.dtype == getattr(torch, param_dtype) for p in fused.parameters())
    ref_loss, ref_grads = _loss_and_grads(ref, batch)
    loss, grads = _loss_and_grads(fused, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert len(grads) == len(ref_grads) == 3 * LAYERS
    for got, want in zip(grads, ref_grads, strict=True):
        assert want.abs().max() > 0
        tol = 1e-4 if param_dtype == "float32" else 1e-2  # bf16 gradients: rounded once either way
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_fused_lora_kl_equals_kl_exact_of_the_same_logits():
    g = torch.Generator().manual_seed(3)
    n, hr = 21, 6
    ax, b, bias = torch.randn(n, hr, generator=g), torch.randn(V, hr, generator=g), torch.randn(V, generator=g)
    base = torch.randn(n, V, generator=g)
    target = exact_target(torch.randn(n, V, generator=g))
    mask = torch.rand(n, generator=g) > 0.3
    args = [t.clone().requires_grad_() for t in (ax, b, bias)]
    got = fused_lora_kl(*args, base, target, mask, scale=0.5, chunk=4)
    got.backward()
    ref_args = [t.clone().requires_grad_() for t in (ax, b, bias)]
    want = kl_exact(target, base + ref_args[2] + 0.5 * ref_args[0] @ ref_args[1].T, mask)
    want.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for a, r in zip(args, ref_args, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-6)


def test_the_fused_path_is_taken_where_it_holds_no_more_memory():
    assert prefers_fused(n_heads=9, rank=4, tokens=256, base_bytes=2)  # SmolLM2, the default
    assert prefers_fused(n_heads=32, rank=4, tokens=256, base_bytes=2)  # Llama-3-8B, within 5%
    assert not prefers_fused(n_heads=32, rank=64, tokens=256, base_bytes=2)
    assert not prefers_fused(n_heads=9, rank=4, tokens=16, base_bytes=2)
    assert _lens_set(None, rank=2).uses_fused(TOKENS)  # (3 * 2 + 1) * 4 <= 37 * 4
    assert not _lens_set(None, rank=16).uses_fused(TOKENS)
    assert not _lens_set(None, loss="subset").uses_fused(TOKENS)
    with pytest.raises(ValueError, match="fused needs"):
        _lens_set(True, loss="subset")
