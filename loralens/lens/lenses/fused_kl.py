"""The joint lora objective's exact KL with its gradient computed in the forward pass, one chunk at a time.

One layer's lens logits are ``l = base + bias + s (A x) B^T`` (``base = W_fold sum_h x_h``, frozen) and the loss
is ``sum_t w_t KL(p_t || softmax(l_t))``, whose gradient w.r.t. ``l_t`` is ``w_t (softmax(l_t) - p_t)``. From that
``[chunk, vocab]`` block the gradients of the small inputs follow by three cheap products::

    d ax   = s G B          [chunk, H r]
    d B^T  = s ax^T G       [H r, vocab]   (summed over chunks)
    d bias = sum_t G_t      [vocab]        (summed over chunks)

So the forward builds each chunk's logits once, reads the loss and those gradients off it in place, and frees
it: no ``[chunk, vocab]`` block is recomputed (activation checkpointing would build it twice and run the
autograd graph of logsumexp over it), and the backward only scales the held gradients. They are summed in fp32
whatever the parameters' dtype and cast to it once per micro-batch. Memory: per layer, the held gradients
``(V H r + V + T H r) 4`` bytes until the backward, instead of the checkpointed path's frozen base ``T V bb``
(:func:`prefers_fused`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from loralens.lens.lenses.losses import ExactTarget

F32 = 4


HELD_SLACK = 1.05  # fused may hold up to 5% more than the checkpointed path


def prefers_fused(n_heads: int, rank: int, tokens: int, base_bytes: int) -> bool:
    """Return whether the fused loss holds (within 5%) no more memory than the checkpointed path per layer.

    Fused holds a layer's gradients, ``V (H r + 1) 4`` bytes, from its forward to the backward; the checkpointed
    path holds the layer's frozen base logits ``T V bb`` for as long (``bb`` bytes per base element). SmolLM2
    (9 heads) at rank 4 and 256 tokens with a bf16 base: 148 vs 512 bytes per vocabulary row, fused; Llama-3-8B
    (32 heads): 516 vs 512, fused; rank 8 or 64 keeps the checkpointed path, whose gradients ZeRO 2/3 reduce and
    free during the backward instead of holding them all.
    """
    return (n_heads * rank + 1) * F32 <= HELD_SLACK * tokens * base_bytes


class _FusedLoraKL(torch.autograd.Function):
    """Forward: the weighted KL sum and the input gradients; backward: those gradients times the output's."""

    @staticmethod
    def forward(ctx, ax: Tensor, b: Tensor, bias: Tensor, base: Tensor, probs: Tensor, neg_entropy: Tensor,
                weights: Tensor, scale: float, chunk: int) -> Tensor:
        ax32, bt32, bias32 = ax.float(), b.float().T.contiguous(), bias.float()  # [T, Hr], [Hr, V], [V]
        n_tokens = base.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=base.device)
        d_ax = torch.zeros_like(ax32)
        d_bt = torch.zeros_like(bt32)
        d_bias = torch.zeros_like(bias32)
        skip_empty = weights.device.type == "cpu"  # an all-padding chunk costs nothing, without a device sync
        for start in range(0, n_tokens, chunk):
            rows = slice(start, min(start + chunk, n_tokens))
            w = weights[rows]
            if skip_empty and not bool((w > 0).any()):
                continue
            q = base[rows].to(torch.float32, copy=True)  # [c, V], turned in place into the softmax and the gradient
            q.add_(bias32).addmm_(ax32[rows], bt32, alpha=scale)
            p = probs[rows]
            cross = torch.linalg.vecdot(p, q)  # [c]: sum_v p_v l_v
            top = q.amax(-1, keepdim=True)
            q.sub_(top).exp_()  # exp(l - max)
            norm = q.sum(-1, keepdim=True)
            kl = neg_entropy[rows] - cross + (top + norm.log()).squeeze(-1)
            total += torch.where(w > 0, kl * w, 0.0).sum()
            q.div_(norm).sub_(p).mul_(w[:, None])  # G = w (softmax(l) - p), in place
            d_bias += q.sum(0)
            d_bt.addmm_(ax32[rows].T, q, alpha=scale)
            d_ax[rows] = torch.mm(q, bt32.T).mul_(scale)
        ctx.save_for_backward(d_ax, d_bt, d_bias)
        ctx.dtypes = (ax.dtype, b.dtype, bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        d_ax, d_bt, d_bias = ctx.saved_tensors
        ax_dt, b_dt, bias_dt = ctx.dtypes
        return ((d_ax * grad).to(ax_dt), (d_bt.T * grad).to(b_dt), (d_bias * grad).to(bias_dt),
                None, None, None, None, None, None)


def fused_lora_kl(ax: Tensor, b: Tensor, bias: Tensor, base: Tensor, target: ExactTarget, mask: Tensor,
                  scale: float, chunk: int) -> Tensor:
    """Return the masked mean over tokens of KL(target || softmax(base + bias + scale ax b^T)), differentiable
    w.r.t. ``ax`` ``[T, H r]``, ``b`` ``[V, H r]`` and ``bias`` ``[V]``.

    ``base`` ``[T, V]`` (no grad; bf16 or fp32), ``target`` over the same ``T`` tokens, ``mask`` ``[T]`` bool;
    computed in fp32 ``chunk`` tokens at a time (see the module docstring). Equals
    ``kl_exact(target, logits, mask)`` of the same logits up to float rounding.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    mask = mask.to(device=base.device, dtype=torch.bool)
    weights = mask.float() / mask.sum().clamp(min=1)
    return _FusedLoraKL.apply(ax, b, bias, base, target.probs, target.neg_entropy, weights, float(scale), chunk)
