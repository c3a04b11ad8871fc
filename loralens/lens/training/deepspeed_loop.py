"""DeepSpeed training of a LensSet: process setup, the DeepSpeed config and the loop.

Data: `loralens.lens.training.batches`; checkpoints: `loralens.lens.training.checkpoints`.

The trainer never sees the language model or the Parquet files: it gets a `ShardLoader` (shard index
-> numpy arrays) and per-shard row counts, so it stays testable and storage-agnostic.

Data order depends only on (seed, epoch, step, rank), so a run resumed from a checkpoint replays exactly
the batches an uninterrupted run would have seen. All ranks take the same number of steps per epoch
(the smallest rank's count), since a rank that stops early would hang the others in all-reduce.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loralens.killpoints import maybe_kill
from loralens.lens.lenses.objective import LensSet
from loralens.lens.runtime.devices import dist_backend
from loralens.lens.training.batches import ShardLoader, rank_shards, steps_per_epoch, train_batches
from loralens.lens.training.checkpoints import (
    CHECKPOINT_DONE,
    checkpoint_tag,
    rank0_object,
    resume,
    save_checkpoint,
)

log = logging.getLogger("loralens.train")

STOP_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM after a checkpoint; re-run to resume


# -- process setup -------------------------------------------------------------------------------
_STOP = {"requested": False}


def install_stop_handler() -> None:
    """Turn SIGTERM into a stop request honoured at the next step boundary (after a checkpoint)."""
    signal.signal(signal.SIGTERM, lambda *_: _STOP.__setitem__("requested", True))


def stop_requested() -> bool:
    """Return whether this process received SIGTERM."""
    return _STOP["requested"]


def free_port() -> int:
    """Return a free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_process_env(device: torch.device) -> None:
    """Prepare env for DeepSpeed: CPU accelerator, and a one-rank world when no launcher set one."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # torch 2.13 deprecation warnings, printed dozens of times per run by ZeRO collectives
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU); return (rank, world)."""
    import deepspeed

    # DeepSpeed JIT-compiles a shared-memory comm op (~30 s of g++) that only inference all-reduce uses.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist_backend(device))
    import deepspeed.comm as dist

    return dist.get_rank(), dist.get_world_size()


# -- the loop ------------------------------------------------------------------------------------
@dataclass
class TrainSpec:
    """Everything the loop needs besides the model: data layout, schedule and DeepSpeed settings."""

    shards: list[int]
    train_rows: dict[int, int]
    store_dtype: str
    micro_batch: int
    epochs: int
    max_steps: int | None
    lr: float
    weight_decay: float
    zero_stage: int
    seed: int
    every: int
    checkpoint_every: int
    bf16: bool = False


@dataclass
class TrainResult:
    """What a finished (or stopped) training run did."""

    steps: int
    resumed_from: int
    stopped: bool
    tokens_per_rank: int
    seconds: float
    final_tag: str | None


def deepspeed_config(spec: TrainSpec) -> dict:
    """Return the DeepSpeed config dict (fp32 or bf16, ZeRO stage, clipping, quiet logging)."""
    zero: dict = {"stage": spec.zero_stage}
    if spec.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": 1,  # one LensBatch of `micro_batch` tokens per rank per step
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.bf16},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def train(
    lens_set: LensSet,
    loader: ShardLoader,
    spec: TrainSpec,
    ckpt_dir: Path,
    *,
    device: torch.device,
    on_step: Callable[[int, float, int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TrainResult, object]:
    """Train under DeepSpeed from the newest checkpoint; return the result and the engine.

    `on_step(step, loss, tokens)` is called on every rank with the loss averaged over ranks.
    """
    import deepspeed
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = rank_shards(spec.shards, rank, world)
    if not mine:
        raise ValueError(f"rank {rank} has no cache shard: {len(spec.shards)} shards for {world} processes")
    per_epoch = steps_per_epoch(spec.train_rows, world, spec.micro_batch)
    if per_epoch == 0:
        raise ValueError(f"too few training tokens for micro_batch_tokens={spec.micro_batch} x {world} processes")
    total = per_epoch * spec.epochs if spec.max_steps is None else min(spec.max_steps, per_epoch * spec.epochs)

    torch.manual_seed(spec.seed)
    lens_set.to(device)
    trainable = [p for p in lens_set.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
    engine, *_ = deepspeed.initialize(model=lens_set, optimizer=opt, model_parameters=trainable,
                                      config=deepspeed_config(spec))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start = resume(engine, ckpt_dir, world, device)
    step, stopped, t0 = start, False, time.perf_counter()
    while step < total:
        epoch, in_epoch = divmod(step, per_epoch)
        n_steps = min(per_epoch, total - epoch * per_epoch)
        for batch in train_batches(loader, mine, spec.train_rows, epoch=epoch, seed=spec.seed,
                                   micro_batch=spec.micro_batch, n_steps=n_steps, skip_steps=in_epoch,
                                   every=spec.every, store_dtype=spec.store_dtype):
            loss = engine(batch.to(device))
            engine.backward(loss)
            engine.step()
            step += 1
            maybe_kill("train.after_step")
            # On the rank's device: NCCL refuses host tensors in a collective.
            stats = torch.tensor([loss.item(), float(stop_requested())], device=device)
            dist.all_reduce(stats)  # mean loss for the curve; any rank's SIGTERM stops every rank
            if on_step is not None:
                on_step(step, stats[0].item() / world, spec.micro_batch * world)
            if progress is not None:
                progress(step, total)
            stopped = stats[1].item() > 0
            if stopped or step % spec.checkpoint_every == 0 or step == total:
                save_checkpoint(engine, ckpt_dir, step, rank, world)
            if stopped:
                break
        if stopped:
            break
    final = checkpoint_tag(step) if not stopped else None
    # e.g. resumed at the last step; rank 0's view of the marker decides for every rank (save is a collective)
    if final is not None and not rank0_object((ckpt_dir / final / CHECKPOINT_DONE).exists(), device):
        save_checkpoint(engine, ckpt_dir, step, rank, world)
    result = TrainResult(steps=step, resumed_from=start, stopped=stopped,
                         tokens_per_rank=(step - start) * spec.micro_batch,
                         seconds=time.perf_counter() - t0, final_tag=final)
    return result, engine
