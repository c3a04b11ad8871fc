"""Resumable DeepSpeed checkpoints of the lens loop: a completion marker per checkpoint, pruning, resume, export."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from loralens.killpoints import maybe_kill

log = logging.getLogger("loralens.train")

CHECKPOINT_DONE = "COMPLETE"


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


def rank0_object(value, device: torch.device):
    """Return rank 0's `value` on every rank (a collective; with no process group, `value` itself).

    Ranks never decide alone from their own view of the filesystem whether to enter a collective: on a shared
    filesystem (NFS) they can disagree, and a rank that skips a collective the others entered hangs the job.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """Return whether `ok` holds on every rank (a MIN all-reduce; with no process group, `ok`)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def resume(engine, ckpt_dir: Path, world: int, device: torch.device | None = None) -> int:
    """Load the newest complete checkpoint that loads on every rank; return its step (0 when starting fresh).

    Rank 0 lists the checkpoints and every rank follows its list; a checkpoint counts as loaded only when it
    loaded on every rank, otherwise all ranks fall back to the one before together.
    """
    device = device or torch.device("cpu")  # host: gloo collectives (CPU ranks, or no process group)
    tags = rank0_object([tag for _step, tag in complete_checkpoints(ckpt_dir)], device)
    for tag in reversed(tags):
        meta = json.loads((ckpt_dir / tag / CHECKPOINT_DONE).read_text())
        if meta["world_size"] != world:
            raise RuntimeError(f"checkpoint {ckpt_dir / tag} was written by {meta['world_size']} processes; "
                               f"resume with world_size {meta['world_size']} (or --force to restart)")
        try:
            path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
            loaded = path is not None
        except Exception as err:  # a damaged checkpoint: fall back to the one before
            log.warning("checkpoint %s does not load (%s); trying an older one", tag, str(err).splitlines()[0])
            loaded = False
        if not all_ranks_ok(loaded, device):
            continue
        log.info("resumed from checkpoint %s", tag)
        return int(client["step"])
    return 0


def consolidated_state(engine, ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Return the full fp32 state dict of the trained LensSet, whatever the world size or ZeRO stage (fp32
    parameters: at ZeRO-0 the module's own weights are the ones the optimizer steps)."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def fp32_master_state(engine) -> dict[str, torch.Tensor]:
    """Return the full state dict of a mixed-precision (bf16) engine's LensSet with every trained parameter taken
    from the optimizer's fp32 master copy, not the bf16-rounded module weights (a collective: every rank calls it).

    bf16 trains under ZeRO-2/3, whose optimizers link each parameter to its fp32 master fragments;
    `deepspeed.utils.safe_get_full_fp32_param` gathers them from every rank.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        master = safe_get_full_fp32_param(param)
        if master is None:  # no fp32 master linked to it (e.g. ZeRO-0): never save its bf16 rounding silently
            raise RuntimeError(f"no fp32 master weight for {name} under {type(engine.optimizer).__name__}")
        state[name] = master.detach().float().cpu().reshape(getattr(param, "ds_shape", param.shape))  # ZeRO-3: full
    return state


def final_state(engine, ckpt_dir: Path, tag: str, zero_stage: int, *, bf16: bool,
                rank: int) -> dict[str, torch.Tensor] | None:
    """Return the fp32 state dict of the trained LensSet on rank 0 (None elsewhere); every rank calls it.

    bf16 parameters: the optimizer's fp32 masters (collective); fp32 parameters: `consolidated_state` (rank 0).
    """
    if bf16:
        state = fp32_master_state(engine)
        return state if rank == 0 else None
    return consolidated_state(engine, ckpt_dir, tag, zero_stage) if rank == 0 else None


def rank0_state(state: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Return rank 0's state dict on every rank, on `device` (collectives; with no process group, `state`).

    Rank 0 passes its tensors, the others None: names, shapes and dtypes go first, then one broadcast per tensor
    (NCCL moves device tensors only, so the tensors travel on `device`).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        assert state is not None
        return state
    meta = rank0_object(None if state is None else {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, device)
    out = {}
    for k, (shape, dtype) in meta.items():
        t = state[k].to(device).contiguous() if state is not None else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=0)
        out[k] = t
    return out
