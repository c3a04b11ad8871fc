"""DeepSpeed training of a LensSet: process setup, the DeepSpeed config and the loop.

Data: `loralens.lens.training.batches`; checkpoints: `loralens.lens.training.checkpoints`.

The trainer never sees the language model or the Parquet files: it gets a `ShardLoader` (shard index
-> numpy arrays) and per-shard row counts, so it stays testable and storage-agnostic.

Data order depends only on (seed, epoch, micro-batch, rank), so a run resumed from a checkpoint replays exactly
the batches an uninterrupted run would have seen. All ranks take the same number of steps per epoch
(the smallest rank's count), since a rank that stops early would hang the others in all-reduce.

Keeping the device busy: an optimizer step runs `grad_accum` micro-batches; the loss is summed on the device
and read on the host only at a sync point (every `log_every` optimizer steps and the last one), where one
all-reduce carries the loss sums, any rank's SIGTERM and rank 0's wall-clock checkpoint decision.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    atexit.register(shutdown_distributed)  # every return path of a rank's process tears it down again
    import deepspeed.comm as dist

    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Destroy torch.distributed's process group if one is up. A rank that exited with its gloo group alive
    sometimes died in C++ teardown ("terminate called without an active exception", SIGABRT) after its work was
    done: seen in the 2-rank held-out evaluation test, about one run in four."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10  # optimizer steps per sync point (curve row, SIGTERM and wall-clock checkpoint check)
    checkpoint_minutes: float | None = None  # also checkpoint when this much wall time passed (rank 0's clock)
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs during training (never on CPU)


@dataclass
class TrainResult:
    """What a finished (or stopped) training run did."""

    steps: int
    resumed_from: int
    stopped: bool
    tokens_per_rank: int
    seconds: float
    final_tag: str | None
    tf32: bool = False  # whether TF32 matmuls were on (a CUDA device of compute capability 8.0 or newer)
    # Host wall seconds of the run by part: waiting for a batch (read), forward/backward/step (compute; on a GPU
    # mostly kernel launches, the device work itself is waited for at the next sync), the sync points' all-reduce
    # (sync), and checkpoint saves (checkpoint).
    timing: dict[str, float] = field(default_factory=dict)


BF16_NEEDS_ZERO = ("train.param_dtype 'bfloat16' needs train.zero_stage 2 or 3 (DeepSpeed 0.19 sums a bf16 lens's "
                   "micro-batch gradients in bf16 at ZeRO 0 and 1)")


def deepspeed_config(spec: TrainSpec) -> dict:
    """Return the DeepSpeed config dict (fp32 or bf16, ZeRO stage, clipping, quiet logging).

    bf16 parameters get fp32 gradient accumulation (`data_types.grad_accum_dtype`) into the ZeRO-2/3 optimizer's
    fp32 gradient partitions, and the optimizer steps its fp32 master partitions. DeepSpeed 0.19 rejects bf16 with
    fp32 accumulation without ZeRO, and at ZeRO-1 routes it to BF16_Optimizer, whose fp32 buffer receives the
    bf16-rounded sum of the micro-batch gradients: both are refused (BF16_NEEDS_ZERO).
    """
    if spec.bf16 and spec.zero_stage < 2:
        raise ValueError(BF16_NEEDS_ZERO)
    zero: dict = {"stage": spec.zero_stage}
    if spec.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    config = {
        "train_micro_batch_size_per_gpu": 1,  # one LensBatch of `micro_batch` tokens per rank per step
        "gradient_accumulation_steps": spec.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.bf16},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if spec.bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


@contextmanager
def tf32_matmuls(enabled: bool, device: torch.device) -> Iterator[bool]:
    """Run the block with TF32 fp32 matmuls when `enabled` on a CUDA device of compute capability 8.0+ (Ampere
    or newer); yield whether they are on. The previous precision is restored on exit (held-out evaluation stays
    full fp32). Nothing changes on CPU or older GPUs."""
    on = enabled and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    if not on:
        yield False
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 (lens training runs matmuls only, no convolutions)
    try:
        yield True
    finally:
        torch.set_float32_matmul_precision(before)


def train(
    lens_set: LensSet,
    loader: ShardLoader,
    spec: TrainSpec,
    ckpt_dir: Path,
    *,
    device: torch.device,
    on_log: Callable[[int, float, int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TrainResult, object]:
    """Train under DeepSpeed from the newest checkpoint; return the result and the engine.

    `on_log(step, loss, tokens)` is called on every rank at each sync point (every `spec.log_every` optimizer
    steps and the last step): `loss` is the mean loss over the micro-batches of every rank since the previous
    sync point, `tokens` the training tokens that mean covers.
    """
    with tf32_matmuls(spec.tf32, device) as tf32:
        result, engine = _train(lens_set, loader, spec, ckpt_dir, device=device, on_log=on_log, progress=progress)
    result.tf32 = tf32
    return result, engine


def _train(lens_set: LensSet, loader: ShardLoader, spec: TrainSpec, ckpt_dir: Path, *, device: torch.device,
           on_log: Callable[[int, float, int], None] | None,
           progress: Callable[[int, int], None] | None) -> tuple[TrainResult, object]:
    import deepspeed
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = rank_shards(spec.shards, rank, world)
    if not mine:
        raise ValueError(f"rank {rank} has no cache shard: {len(spec.shards)} shards for {world} processes")
    n = spec.grad_accum
    per_epoch = steps_per_epoch(spec.train_rows, world, spec.micro_batch) // n  # optimizer steps
    if per_epoch == 0:
        raise ValueError(f"too few training tokens for micro_batch_tokens={spec.micro_batch} x {world} processes "
                         f"x grad_accum_steps={n}")
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
    timing = dict.fromkeys(("read", "compute", "sync", "checkpoint"), 0.0)
    loss_sum = torch.zeros((), device=device)  # this rank's micro-batch losses since the last sync point
    since_sync = 0  # micro-batches in loss_sum
    last_ckpt = time.monotonic()  # rank 0's clock is the one that decides

    def checkpoint() -> None:
        nonlocal last_ckpt
        t = time.perf_counter()
        save_checkpoint(engine, ckpt_dir, step, rank, world)
        timing["checkpoint"] += time.perf_counter() - t
        last_ckpt = time.monotonic()

    while step < total:
        epoch, in_epoch = divmod(step, per_epoch)
        n_steps = min(per_epoch, total - epoch * per_epoch)
        batches = train_batches(loader, mine, spec.train_rows, epoch=epoch, seed=spec.seed,
                                micro_batch=spec.micro_batch, n_steps=n_steps * n, skip_steps=in_epoch * n,
                                every=spec.every, store_dtype=spec.store_dtype)
        micro = 0
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            timing["read"] += time.perf_counter() - t
            if batch is None:
                break
            t = time.perf_counter()
            micro += 1
            boundary = micro % n == 0
            if engine.is_gradient_accumulation_boundary() != boundary:
                raise RuntimeError(f"DeepSpeed's gradient accumulation boundary is out of step with the loop's "
                                   f"at step {step}, micro-batch {micro}")
            loss = engine(batch.to(device))
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += loss.detach().float()
            since_sync += 1
            timing["compute"] += time.perf_counter() - t
            if not boundary:
                continue
            step += 1
            maybe_kill("train.after_step")
            if step % spec.log_every == 0 or step == total:
                t = time.perf_counter()
                time_due = (rank == 0 and spec.checkpoint_minutes is not None
                            and time.monotonic() - last_ckpt >= 60 * spec.checkpoint_minutes)
                # One collective (on the rank's device: NCCL refuses host tensors) and one host read per sync
                # point: the loss sums, any rank's SIGTERM, and rank 0's clock (only rank 0 adds it: a broadcast).
                flags = torch.tensor([since_sync, float(stop_requested()), float(time_due)], device=device)
                stats = torch.cat([loss_sum.reshape(1), flags])
                dist.all_reduce(stats)
                loss_total, micro_total, stop, due = stats.tolist()
                timing["sync"] += time.perf_counter() - t
                if on_log is not None:
                    on_log(step, loss_total / micro_total, int(micro_total) * spec.micro_batch)
                loss_sum.zero_()
                since_sync = 0
                stopped, time_due = stop > 0, due > 0
            else:
                time_due = False
            if progress is not None:
                progress(step, total)
            if stopped or time_due or step % spec.checkpoint_every == 0 or step == total:
                checkpoint()
            if stopped:
                break
        if stopped:
            break
    final = checkpoint_tag(step) if not stopped else None
    # e.g. resumed at the last step; rank 0's view of the marker decides for every rank (save is a collective)
    if final is not None and not rank0_object((ckpt_dir / final / CHECKPOINT_DONE).exists(), device):
        checkpoint()
    result = TrainResult(steps=step, resumed_from=start, stopped=stopped,
                         tokens_per_rank=(step - start) * spec.micro_batch * n,
                         seconds=time.perf_counter() - t0, final_tag=final, timing=timing)
    return result, engine
