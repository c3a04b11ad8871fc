"""KL(p_target || p_lens) losses, chunked over tokens to bound peak memory.

The lens side is either a tensor of logits ``[tokens, vocab]`` (joint objective)
or ``[tokens, heads, vocab]`` (per-head objective; the target is broadcast over
heads and the loss is averaged over heads), or a callable ``fn(rows: slice)``
returning those logits for ``tokens[rows]`` only. With a callable and autograd
on, each chunk runs under non-reentrant activation checkpointing, so neither the
full lens logits nor their softmax are ever alive at once: peak memory is one
chunk's ``[chunk, (heads,) vocab]`` in forward and again in backward, e.g.::

    loss = kl_exact(target, lambda rows: bank.layer_logits(x[rows]), mask, chunk=256)

(A bank with bf16 parameters takes one ``Upcast`` shared by every chunk, as ``LensSet.lens_fn`` passes it, so
that the chunks' gradients are summed in fp32.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LensLogits = Tensor | Callable[[slice], Tensor]

_LN2 = math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """Return ``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (-inf at x = 0)."""
    # Maechler (2012): expm1 near 0, log1p far from 0; x is clamped so rounding
    # that pushes a log-mass slightly above 0 reads as an empty tail, not NaN.
    x = x.clamp(max=0.0)
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _lens_fn(lens: LensLogits) -> Callable[[slice], Tensor]:
    """Return a row-slice -> logits function for a tensor or callable lens."""
    if isinstance(lens, Tensor):
        return lambda rows: lens[rows]
    return lens


def _needs_grad(lens: LensLogits) -> bool:
    """Return whether chunk losses must keep a graph (and so be checkpointed)."""
    if not torch.is_grad_enabled():
        return False
    return lens.requires_grad if isinstance(lens, Tensor) else True


def _weighted_sum(p: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    """Return ``sum p * (logp - logq)`` over the last axis, with 0 * log 0 = 0."""
    # where() keeps the gradient w.r.t. logq finite when p == 0 and logp == -inf.
    term = torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=p.dtype, device=p.device))
    return term.sum(-1)


def _reduce_rows(kl: Tensor, mask: Tensor) -> Tensor:
    """Return the masked sum over rows of ``[n]`` or ``[n, heads]`` KL, head-averaged."""
    if kl.dim() == 2:
        kl = kl.mean(-1)
    return torch.where(mask, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum()  # a padded row's NaN: 0


def _chunked_mean(
    n_tokens: int,
    mask: Tensor | None,
    chunk: int,
    row_kl: Callable[[slice], Tensor],
    use_checkpoint: bool,
    device: torch.device,
) -> Tensor:
    """Return the masked mean over tokens of ``row_kl`` evaluated chunk by chunk."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if mask is None:
        mask = torch.ones(n_tokens, dtype=torch.bool, device=device)
    if tuple(mask.shape) != (n_tokens,):
        raise ValueError(f"mask must be [{n_tokens}], got {tuple(mask.shape)}")
    mask = mask.to(device=device, dtype=torch.bool)
    total = torch.zeros((), dtype=torch.float32, device=device)
    # An all-padding chunk costs no lens forward, when the mask is on the host; on an accelerator the test would be
    # a host sync per chunk, so every chunk runs there (padded rows weigh 0 in `_reduce_rows`).
    skip_padding = mask.device.type == "cpu"
    for start in range(0, n_tokens, chunk):
        rows = slice(start, min(start + chunk, n_tokens))
        m = mask[rows]
        if skip_padding and not bool(m.any()):
            continue

        def part(rows: slice = rows, m: Tensor = m) -> Tensor:
            return _reduce_rows(row_kl(rows), m)

        total = total + (checkpoint(part, use_reentrant=False) if use_checkpoint else part())
    return total / mask.sum().clamp(min=1).to(total.dtype)


@dataclass(frozen=True)
class ExactTarget:
    """Target distribution prepared once and shared by every lens scored against it."""

    probs: Tensor  # [tokens, vocab] float32
    neg_entropy: Tensor  # [tokens] sum_v p log p

    def rows(self, rows: slice | Tensor) -> ExactTarget:
        """Return the target of `rows` only (a slice or a bool mask over tokens)."""
        return ExactTarget(probs=self.probs[rows], neg_entropy=self.neg_entropy[rows])


def exact_target(target_logits: Tensor) -> ExactTarget:
    """Return the target probabilities and negative entropy `[tokens]` (no grad)."""
    with torch.no_grad():
        logp = F.log_softmax(target_logits.float(), dim=-1)
        p = logp.exp()
        return ExactTarget(probs=p, neg_entropy=torch.where(p > 0, p * logp, 0.0).sum(-1))


def kl_from_logits(target: ExactTarget, logits: Tensor) -> Tensor:
    """Return KL(target || softmax(logits)) per token `[tokens]`, or per head `[tokens, heads]`, in float32.

    `logits` `[tokens, vocab]` or `[tokens, heads, vocab]` (the target is shared by the heads). Uses
    KL = sum p log p - sum_v p_v l_v + logsumexp(l): one product-sum and one logsumexp pass over the vocabulary
    (gradient softmax(l) - p), no log-softmax of the lens; the per-head product-sum is one batched matmul, so no
    second `[tokens, heads, vocab]` block is built.
    """
    q = logits.float()
    if q.dim() == 3:
        cross = torch.einsum("nv,nhv->nh", target.probs, q)
        return target.neg_entropy[:, None] - cross + torch.logsumexp(q, dim=-1)
    return target.neg_entropy - (target.probs * q).sum(-1) + torch.logsumexp(q, dim=-1)


def kl_exact(
    target: Tensor | ExactTarget,
    lens: LensLogits,
    mask: Tensor | None = None,
    chunk: int = 512,
) -> Tensor:
    """Return mean over masked tokens of KL(softmax(target) || softmax(lens)), full vocab.

    ``target``: logits ``[tokens, vocab]`` (no grad needed) or an ``ExactTarget`` prepared once with
    ``exact_target`` and reused across lenses; ``lens``: logits ``[tokens, vocab]`` /
    ``[tokens, heads, vocab]`` or a ``fn(rows: slice)`` producing them for a token chunk; ``mask``:
    ``[tokens]`` bool (None = all). Lens logits must be finite. Computed in float32 whatever the input
    dtype. Differentiable w.r.t. the lens. Each chunk is :func:`kl_from_logits`.
    """
    if isinstance(target, Tensor):
        target = exact_target(target)
    fn = _lens_fn(lens)

    def row_kl(rows: slice) -> Tensor:
        return kl_from_logits(target.rows(rows), fn(rows))

    n_tokens = target.probs.shape[0]
    return _chunked_mean(n_tokens, mask, chunk, row_kl, _needs_grad(lens), target.probs.device)


def kl_subset(
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    lens: LensLogits,
    mask: Tensor | None = None,
    chunk: int = 512,
) -> Tensor:
    """Return mean over masked tokens of the top-k + tail-bucket KL(target || lens).

    Both distributions are coarsened to k+1 outcomes: the target's top-k token
    ids (``topk_ids [tokens, k]``, distinct per row) and ONE tail bucket holding
    all other tokens. Target masses come from ``topk_logprobs [tokens, k]``
    (normalised log-probs: subtract the target's logsumexp first if you stored
    raw logits), with tail mass ``1 - sum(exp(topk_logprobs))``. Lens masses are
    its full-vocab softmax on those ids, and the lens tail is a logsumexp over
    the non-top-k logits (exact, no ``1 - sum`` cancellation).

    Coarsening by a deterministic map can only lose information, so by the
    data-processing inequality this is a LOWER bound of the exact KL; refining
    k -> k+1 splits the tail, so it is non-decreasing in k and equals the exact
    KL when k = vocab. ``lens`` is as in :func:`kl_exact`.
    """
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 2:
        raise ValueError(
            f"topk_ids and topk_logprobs must both be [tokens, k], got "
            f"{tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}"
        )
    fn = _lens_fn(lens)

    def row_kl(rows: slice) -> Tensor:
        ids, logp = topk_ids[rows], topk_logprobs[rows].float()
        logits = fn(rows).float()
        if logits.dim() == 3:
            ids = ids.unsqueeze(1).expand(-1, logits.shape[1], -1)
            logp = logp.unsqueeze(1)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        logq = logits.gather(-1, ids) - lse
        kl = _weighted_sum(logp.exp(), logp, logq)
        if ids.shape[-1] >= logits.shape[-1]:
            return kl  # top-k covers the vocab: no tail bucket, exact KL
        logp_tail = log1mexp(torch.logsumexp(logp, dim=-1, keepdim=True))
        # Rows with k < vocab distinct ids keep >= 1 finite tail logit, so the
        # -inf fill never yields an all -inf logsumexp (which would NaN in backward).
        tail_logits = logits.scatter(-1, ids, float("-inf"))
        logq_tail = torch.logsumexp(tail_logits, dim=-1, keepdim=True) - lse
        return kl + _weighted_sum(logp_tail.exp(), logp_tail, logq_tail)

    return _chunked_mean(topk_ids.shape[0], mask, chunk, row_kl, _needs_grad(lens), topk_logprobs.device)
