"""The lora lens's exact KL with its gradient computed in the forward pass, one chunk at a time.

Under the joint objective one layer's lens logits are ``l = base + bias + s (A x) B^T`` (``base = W_fold sum_h
x_h``, frozen); under per_head each head's are ``l_h = W_fold x_h + bias_h + s (A_h x_h) B_h^T``, the same form
once per head (its loss the mean over heads). The loss
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
(:func:`prefers_fused`). Per head the held gradients are ``(V H r + V H + T H r) 4`` bytes and each head's
``[chunk, vocab]`` block is made and freed in turn, where the checkpointed per_head path builds ``[chunk, H,
vocab]`` blocks twice: it is always taken.
"""

from __future__ import annotations

from collections.abc import Callable

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


def takes_fused(form: str, objective: str, loss: str, n_heads: int, rank: int, tokens: int, base_bytes: int) -> bool:
    """Return whether a micro-batch of `tokens` is computed by the fused loss (the rule `LensSet` and the memory
    plan share): the lora form with the exact loss; per_head always, joint where :func:`prefers_fused` says so."""
    if (form, loss) != ("lora", "exact"):
        return False
    return objective == "per_head" or prefers_fused(n_heads, rank, tokens, base_bytes)


class _FusedLoraKL(torch.autograd.Function):
    """Forward: the weighted KL sum and the input gradients; backward: those gradients times the output's.

    ``G`` groups of logits share each chunk's target: one for the joint objective (the layer's sum), one per head
    for per_head. ``ax`` ``[T, G, k]``, ``b`` ``[G, V, k]``, ``bias`` ``[G, V]``; ``base(rows, g)`` returns group
    ``g``'s frozen logits ``[c, V]`` (no grad).
    """

    @staticmethod
    def forward(ctx, ax: Tensor, b: Tensor, bias: Tensor, base: Callable[[slice, int], Tensor], probs: Tensor,
                neg_entropy: Tensor, weights: Tensor, scale: float, chunk: int) -> Tensor:
        ax32, bt32, bias32 = ax.float(), b.float().transpose(1, 2).contiguous(), bias.float()  # [T,G,k] [G,k,V] [G,V]
        n_tokens, groups = ax.shape[0], ax.shape[1]
        total = torch.zeros((), dtype=torch.float32, device=ax.device)
        d_ax = torch.zeros_like(ax32)
        d_bt = torch.zeros_like(bt32)
        d_bias = torch.zeros_like(bias32)
        skip_empty = weights.device.type == "cpu"  # an all-padding chunk costs nothing, without a device sync
        for start in range(0, n_tokens, chunk):
            rows = slice(start, min(start + chunk, n_tokens))
            w = weights[rows]
            if skip_empty and not bool((w > 0).any()):
                continue
            p = probs[rows]
            for g in range(groups):
                q = base(rows, g).to(torch.float32, copy=True)  # [c, V], turned in place into softmax and gradient
                q.add_(bias32[g]).addmm_(ax32[rows, g], bt32[g], alpha=scale)
                cross = torch.linalg.vecdot(p, q)  # [c]: sum_v p_v l_v
                top = q.amax(-1, keepdim=True)
                q.sub_(top).exp_()  # exp(l - max)
                norm = q.sum(-1, keepdim=True)
                kl = neg_entropy[rows] - cross + (top + norm.log()).squeeze(-1)
                total += torch.where(w > 0, kl * w, 0.0).sum()
                q.div_(norm).sub_(p).mul_(w[:, None])  # G = w (softmax(l) - p), in place
                d_bias[g] += q.sum(0)
                d_bt[g].addmm_(ax32[rows, g].T, q, alpha=scale)
                d_ax[rows, g] = torch.mm(q, bt32[g].T).mul_(scale)
        ctx.save_for_backward(d_ax, d_bt, d_bias)
        ctx.dtypes = (ax.dtype, b.dtype, bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        d_ax, d_bt, d_bias = ctx.saved_tensors
        ax_dt, b_dt, bias_dt = ctx.dtypes
        return ((d_ax * grad).to(ax_dt), (d_bt.transpose(1, 2) * grad).to(b_dt), (d_bias * grad).to(bias_dt),
                None, None, None, None, None, None)


def _weights(mask: Tensor, device: torch.device, groups: int) -> Tensor:
    """Return per-token weights `[T]`: 1 / (masked tokens x groups) where masked, else 0 (the loss is a mean)."""
    mask = mask.to(device=device, dtype=torch.bool)
    return mask.float() / (mask.sum().clamp(min=1) * groups)


def fused_lora_kl(ax: Tensor, b: Tensor, bias: Tensor, base: Tensor, target: ExactTarget, mask: Tensor,
                  scale: float, chunk: int) -> Tensor:
    """Return the masked mean over tokens of KL(target || softmax(base + bias + scale ax b^T)), differentiable
    w.r.t. ``ax`` ``[T, H r]``, ``b`` ``[V, H r]`` and ``bias`` ``[V]`` (the joint objective).

    ``base`` ``[T, V]`` (no grad; bf16 or fp32), ``target`` over the same ``T`` tokens, ``mask`` ``[T]`` bool;
    computed in fp32 ``chunk`` tokens at a time (see the module docstring). Equals
    ``kl_exact(target, logits, mask)`` of the same logits up to float rounding.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _FusedLoraKL.apply(ax[:, None], b[None], bias[None], lambda rows, g: base[rows], target.probs,
                              target.neg_entropy, _weights(mask, base.device, 1), float(scale), chunk)


def fused_lora_kl_per_head(ax: Tensor, b: Tensor, bias: Tensor, x: Tensor, w_base: Tensor, target: ExactTarget,
                           mask: Tensor, scale: float, chunk: int) -> Tensor:
    """Return the masked mean over tokens and heads of KL(target || softmax(W x_h + bias_h + scale ax_h b_h^T)),
    differentiable w.r.t. ``ax`` ``[T, H, r]``, ``b`` ``[H, V, r]`` and ``bias`` ``[H, V]`` (the per_head objective:
    each head's lens alone against the model).

    ``x`` ``[T, H, d]`` the heads' lens inputs and ``w_base`` ``[V, d]`` the frozen unembedding (no grad): each head's
    base logits are made one ``[chunk, V]`` block at a time, never ``[T, H, V]``. Equals
    ``kl_exact(target, head_logits, mask)`` up to float rounding.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    def base(rows: slice, g: int) -> Tensor:
        with torch.no_grad():
            return x[rows, g].to(w_base.dtype) @ w_base.T

    return _FusedLoraKL.apply(ax, b, bias, base, target.probs, target.neg_entropy,
                              _weights(mask, x.device, ax.shape[1]), float(scale), chunk)
