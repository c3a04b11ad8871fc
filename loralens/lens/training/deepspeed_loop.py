"""DeepSpeed training of a LensSet: data-parallel ranks over disjoint cache shards, resumable checkpoints.

The trainer never sees the language model or the Parquet files: it gets a `ShardLoader` (shard index
-> numpy arrays) and per-shard row counts, so it stays testable and storage-agnostic.

Data order depends only on (seed, epoch, step, rank), so a run resumed from a checkpoint replays exactly
the batches an uninterrupted run would have seen. All ranks take the same number of steps per epoch
(the smallest rank's count), since a rank that stops early would hang the others in all-reduce.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loralens.killpoints import maybe_kill
from loralens.lens.lenses.objective import LensBatch, LensSet
from loralens.lens.runtime.devices import dist_backend

log = logging.getLogger("loralens.train")

CHECKPOINT_DONE = "COMPLETE"
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


# -- data ------------------------------------------------------------------------------------------
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
    pending: list[LensBatch] = []
    have = 0
    step = skip_steps
    for s in order:
        if step >= n_steps:
            return
        if train_rows[s] <= skip_rows:
            skip_rows -= train_rows[s]
            continue
        data = loader(s)
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
    """Yield the held-out rows of the given shards in fixed order, in micro-batches."""
    for s in shards:
        data = loader(s)
        rows = np.flatnonzero(is_held_out(data.prompt_idx, every))
        for start in range(0, len(rows), micro_batch):
            yield to_batch(data, rows[start : start + micro_batch], store_dtype)


# -- checkpoints -----------------------------------------------------------------------------------
def checkpoint_tag(step: int) -> str:
    """Return the checkpoint folder name of a step."""
    return f"step-{step:07d}"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, str]]:
    """Return (step, tag) of every checkpoint whose completion marker exists, oldest first."""
    out = []
    for d in ckpt_dir.glob("step-*"):
        marker = d / CHECKPOINT_DONE
        if marker.exists():
            out.append((json.loads(marker.read_text())["step"], d.name))
    return sorted(out)


def save_checkpoint(engine, ckpt_dir: Path, step: int, rank: int, world: int, keep: int = 2) -> None:
    """Save a DeepSpeed checkpoint (collective), then mark it complete and prune old ones (rank 0)."""
    import deepspeed.comm as dist

    tag = checkpoint_tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "world_size": world})
    dist.barrier()
    maybe_kill("train.mid_checkpoint")  # the checkpoint's files are written, its marker is not
    if rank == 0:
        marker = ckpt_dir / tag / CHECKPOINT_DONE
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "world_size": world, "time": time.time()}))
        os.replace(tmp, marker)
        for _, old in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    maybe_kill("train.after_checkpoint")


def resume(engine, ckpt_dir: Path, world: int) -> int:
    """Load the newest complete checkpoint that loads; return its step (0 when starting fresh)."""
    for _step, tag in reversed(complete_checkpoints(ckpt_dir)):
        meta = json.loads((ckpt_dir / tag / CHECKPOINT_DONE).read_text())
        if meta["world_size"] != world:
            raise RuntimeError(f"checkpoint {ckpt_dir / tag} was written by {meta['world_size']} processes; "
                               f"resume with world_size {meta['world_size']} (or --force to restart)")
        try:
            path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        except Exception as err:  # a damaged checkpoint: fall back to the one before
            log.warning("checkpoint %s does not load (%s); trying an older one", tag, str(err).splitlines()[0])
            continue
        if path is None:
            continue
        log.info("resumed from checkpoint %s", tag)
        return int(client["step"])
    return 0


def consolidated_state(engine, ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Return the full fp32 state dict of the trained LensSet, whatever the world size or ZeRO stage."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


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
    start = resume(engine, ckpt_dir, world)
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
    if final is not None and not (ckpt_dir / final / CHECKPOINT_DONE).exists():
        save_checkpoint(engine, ckpt_dir, step, rank, world)  # e.g. resumed at the last step
    result = TrainResult(steps=step, resumed_from=start, stopped=stopped,
                         tokens_per_rank=(step - start) * spec.micro_batch,
                         seconds=time.perf_counter() - t0, final_tag=final)
    return result, engine
