"""The lens loop's data: shards read one ahead in a background thread, batches in a fixed order that a resumed run
replays exactly, held-out prompts never trained on."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from loralens.lens.training.batches import ShardData, eval_batches, is_held_out, prefetched, train_batches

ROWS = {0: 10, 1: 7, 2: 12}


def shard(s: int) -> ShardData:
    n = ROWS[s] + 2  # two held-out rows per shard (prompt_idx 0 with every=5)
    z = (np.arange(n * 3, dtype=np.float16).reshape(n, 1, 3) + 100 * s).view(np.uint16)
    return ShardData(z=z, scale=np.full(n, s + 1.0, np.float32), h_final=np.zeros((n, 2), np.float32),
                     topk_ids=None, topk_logprobs=None, prompt_idx=np.array([0, 0] + [1 + s] * ROWS[s], np.int32))


def test_prefetched_yields_in_order_and_reads_one_shard_ahead():
    started, release = [], threading.Event()

    def loader(s: int) -> ShardData:
        started.append(s)
        if s == 2:
            release.wait(5)  # shard 2 is read while the consumer still holds shard 1
        return shard(s)

    it = prefetched(loader, [1, 0, 2])
    s, data = next(it)
    assert s == 1 and data.scale[0] == 2.0
    s, _ = next(it)  # yielding shard 0 starts the read of shard 2
    assert s == 0
    deadline = threading.Event()
    for _ in range(100):
        if started == [1, 0, 2]:
            break
        deadline.wait(0.01)
    assert started == [1, 0, 2]
    release.set()
    assert [s for s, _ in it] == [2]


def test_prefetched_raises_a_reader_error_at_that_shard():
    def loader(s: int) -> ShardData:
        if s == 2:
            raise OSError("shard 2 is unreadable")
        return shard(s)

    it = prefetched(loader, [0, 2])
    assert next(it)[0] == 0
    with pytest.raises(OSError, match="shard 2"):
        next(it)


def collect(skip_steps: int) -> list[torch.Tensor]:
    return [b.z.float().clone() for b in train_batches(shard, [0, 1, 2], ROWS, epoch=1, seed=3, micro_batch=4,
                                                        n_steps=7, skip_steps=skip_steps, every=5,
                                                        store_dtype="float16")]


def test_a_resumed_epoch_replays_exactly_the_remaining_batches():
    full = collect(0)
    assert len(full) == 7  # 29 training rows // 4
    for skip in (1, 3, 6):
        resumed = collect(skip)
        assert len(resumed) == 7 - skip
        for a, b in zip(full[skip:], resumed, strict=True):
            assert torch.equal(a, b)


def test_held_out_prompts_are_never_trained_on_and_eval_reads_only_them():
    held = {float(v) for s in ROWS for v in torch.from_numpy(shard(s).z.view(np.float16)[:2]).float().flatten()}
    trained = {float(v) for z in collect(0) for v in z.flatten()}
    assert not held & trained
    evals = [b for b in eval_batches(shard, [0, 1, 2], every=5, micro_batch=4, store_dtype="float16")]
    assert sum(len(b.scale) for b in evals) == 6 and {float(v) for b in evals for v in b.z.float().flatten()} == held
    assert is_held_out(np.array([0, 1, 5, 6]), 5).tolist() == [True, False, True, False]
