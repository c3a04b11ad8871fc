"""Held-out evaluation of trained lenses, split over the data-parallel ranks.

Each rank evaluates the held-out prompts of its own cache shards (the same disjoint split as training) and the
per-key sums are all-reduced, so the reported means are those one process would compute over every shard (up to
the order of float additions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from loralens.lens.lenses.objective import LensBatch, LensSet, fidelity
from loralens.lens.training.batches import ShardLoader, eval_batches, rank_shards

FIDELITY_KEYS = ("head_lens", "head_logit_lens", "layer_lens", "layer_logit_lens", "layer_subset", "tokens")


def held_out_sums(lens_set: LensSet, batches: Iterable[LensBatch], device: torch.device) -> dict[str, Tensor]:
    """Return the fidelity sums (:func:`fidelity`) of `batches` on `device`; zeros when there is none."""
    L, H = len(lens_set.layers), lens_set.w_o.shape[1]
    sums = {k: torch.zeros(L, H, device=device) for k in FIDELITY_KEYS[:2]}
    sums |= {k: torch.zeros(L, device=device) for k in FIDELITY_KEYS[2:5]}
    sums["tokens"] = torch.zeros((), device=device)
    for batch in batches:
        for k, v in fidelity(lens_set, batch.to(device)).items():
            sums[k] += v
    return sums


def all_ranks_sum(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Return the element-wise sums over every rank (one all-reduce; with no process group, `sums`)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return sums
    flat = torch.cat([sums[k].reshape(-1) for k in FIDELITY_KEYS])  # on the rank's device (NCCL: no host tensors)
    dist.all_reduce(flat)
    out, at = {}, 0
    for k in FIDELITY_KEYS:
        n = sums[k].numel()
        out[k] = flat[at : at + n].reshape(sums[k].shape)
        at += n
    return out


def held_out_fidelity(lens_set: LensSet, loader: ShardLoader, shards: list[int], *, every: int, micro_batch: int,
                      store_dtype: str, device: torch.device,
                      progress: Callable[[Iterator[LensBatch]], Iterable[LensBatch]] | None = None) -> dict:
    """Return the held-out fidelity of `lens_set` over the held-out prompts of `shards`, every rank of the process
    group evaluating its share (`rank_shards`); every rank gets the result.

    Keys: `tokens`, `layers`, per head `head_lens`, `head_logit_lens` `[L][H]`, per layer `layer_lens`,
    `layer_logit_lens`, `layer_subset_kl` `[L]`: mean exact KL (subset KL) per held-out token.
    """
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    lens_set.to(device)
    batches = eval_batches(loader, rank_shards(shards, rank, world), every, micro_batch, store_dtype)
    sums = all_ranks_sum(held_out_sums(lens_set, progress(batches) if progress else batches, device))
    n = float(sums["tokens"])
    if not n:
        raise ValueError("no held-out tokens: lower train.eval_every_nth_prompt or cache more prompts")
    per = lambda key: (sums[key] / n).cpu().tolist()  # noqa: E731
    return {"tokens": n, "layers": lens_set.layers, "head_lens": per("head_lens"),
            "head_logit_lens": per("head_logit_lens"), "layer_lens": per("layer_lens"),
            "layer_logit_lens": per("layer_logit_lens"), "layer_subset_kl": per("layer_subset")}
