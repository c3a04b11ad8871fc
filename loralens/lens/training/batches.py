"""The training data of the lens loop: cache shards split over ranks, held-out prompts, batches in a fixed order.

Data order depends only on (seed, epoch, step, rank), so a run resumed from a checkpoint replays exactly
the batches an uninterrupted run would have seen. All ranks take the same number of steps per epoch
(the smallest rank's count), since a rank that stops early would hang the others in all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from loralens.lens.lenses.objective import LensBatch


@dataclass
class ShardData:
    """One cache shard's training arrays; `n` rows, `L` trained layers."""

    z: np.ndarray  # [n, L, heads*d_head] uint16 bits of fp16/bf16
    scale: np.ndarray  # [n] float32
    h_final: np.ndarray  # [n, d_model] float32
    topk_ids: np.ndarray | None  # [n, k] int32 (None: the cache stored no top-k)
    topk_logprobs: np.ndarray | None  # [n, k] float32
    prompt_idx: np.ndarray  # [n] int32


ShardLoader = Callable[[int], ShardData]


def is_held_out(prompt_idx: np.ndarray, every: int) -> np.ndarray:
    """Return the held-out mask `[n]`: whole prompts, every `every`-th by corpus index."""
    return prompt_idx % every == 0


def rank_shards(shards: list[int], rank: int, world: int) -> list[int]:
    """Return the disjoint shard subset of one data-parallel rank."""
    return [s for s in shards if s % world == rank]


def steps_per_epoch(train_rows: dict[int, int], world: int, micro_batch: int) -> int:
    """Return the optimizer steps per epoch: the smallest rank's full micro-batches."""
    per_rank = [sum(train_rows[s] for s in rank_shards(sorted(train_rows), r, world)) for r in range(world)]
    return min(per_rank) // micro_batch


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def to_batch(data: ShardData, rows: np.ndarray, store_dtype: str) -> LensBatch:
    """Return the LensBatch of the given rows of a shard."""
    bits = torch.from_numpy(np.ascontiguousarray(data.z[rows]).view(np.int16))
    return LensBatch(
        z=bits.view(getattr(torch, store_dtype)),
        scale=torch.from_numpy(data.scale[rows]),
        mask=torch.ones(len(rows), dtype=torch.bool),  # host: the batch is built here, then `.to(device)`
        h_final=torch.from_numpy(data.h_final[rows]),
        topk_ids=None if data.topk_ids is None else torch.from_numpy(data.topk_ids[rows].astype(np.int64)),
        topk_logprobs=None if data.topk_logprobs is None else torch.from_numpy(data.topk_logprobs[rows]),
    )


def _concat(parts: list[LensBatch]) -> LensBatch:
    if len(parts) == 1:
        return parts[0]
    return LensBatch(**{k: None if getattr(parts[0], k) is None else torch.cat([getattr(p, k) for p in parts])
                        for k in parts[0].__dict__})


def prefetched(loader: ShardLoader, shards: Sequence[int]) -> Iterator[tuple[int, ShardData]]:
    """Yield `(shard, loader(shard))` in order, reading the next shard in a background thread while the caller
    works on the current one (one shard ahead: the read and decode hide behind compute). A reader error is raised
    where that shard would have been yielded."""
    if not shards:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") as pool:
        ahead = pool.submit(loader, shards[0])
        for i, s in enumerate(shards):
            data = ahead.result()
            if i + 1 < len(shards):
                ahead = pool.submit(loader, shards[i + 1])
            yield s, data


def train_batches(
    loader: ShardLoader,
    shards: list[int],
    train_rows: dict[int, int],
    *,
    epoch: int,
    seed: int,
    micro_batch: int,
    n_steps: int,
    skip_steps: int,
    every: int,
    store_dtype: str,
) -> Iterator[LensBatch]:
    """Yield this rank's micro-batches of one epoch from step `skip_steps` to `n_steps`.

    Shards are visited in a seeded order, rows within a shard in a seeded order; shards that lie wholly
    before `skip_steps` are skipped without being read.
    """
    order = [shards[i] for i in _rng(seed, epoch).permutation(len(shards))]
    skip_rows = skip_steps * micro_batch
    while order and train_rows[order[0]] <= skip_rows:  # shards wholly before skip_steps: never read
        skip_rows -= train_rows[order.pop(0)]
    pending: list[LensBatch] = []
    have = 0
    step = skip_steps
    for s, data in prefetched(loader, order):
        if step >= n_steps:
            return
        rows = np.flatnonzero(~is_held_out(data.prompt_idx, every))
        rows = rows[_rng(seed, epoch, s).permutation(len(rows))][skip_rows:]
        skip_rows = 0
        while len(rows):
            take = rows[: micro_batch - have]
            rows = rows[len(take) :]
            pending.append(to_batch(data, take, store_dtype))
            have += len(take)
            if have == micro_batch:
                yield _concat(pending)
                pending, have = [], 0
                step += 1
                if step >= n_steps:
                    return


def eval_batches(loader: ShardLoader, shards: list[int], every: int, micro_batch: int,
                 store_dtype: str) -> Iterator[LensBatch]:
    """Yield the held-out rows of the given shards in fixed order, in micro-batches (shards read one ahead)."""
    for _s, data in prefetched(loader, shards):
        rows = np.flatnonzero(is_held_out(data.prompt_idx, every))
        for start in range(0, len(rows), micro_batch):
            yield to_batch(data, rows[start : start + micro_batch], store_dtype)


# -- checkpoints -----------------------------------------------------------------------------------
