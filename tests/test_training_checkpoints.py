"""Rank-0 decisions in the lens loop's checkpoints: two real gloo ranks that see different filesystem states (as on
NFS) follow rank 0's view, and a checkpoint counts as loaded only when every rank loaded it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loralens.lens.training.checkpoints import (
    CHECKPOINT_DONE,
    all_ranks_ok,
    checkpoint_tag,
    complete_checkpoints,
    rank0_object,
)


def mark(ckpt_dir: Path, step: int) -> None:
    d = ckpt_dir / checkpoint_tag(step)
    d.mkdir(parents=True)
    (d / CHECKPOINT_DONE).write_text(json.dumps({"step": step, "world_size": 2}))


def rank_main(rank: int, root: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        view = Path(root) / f"rank{rank}"  # each rank's own (lagging or not) view of the checkpoint folder
        mine = [tag for _s, tag in complete_checkpoints(view)]
        agreed = rank0_object(mine, cpu)
        ok = all_ranks_ok(rank == 0, cpu)  # rank 1 failed to load
        both = all_ranks_ok(True, cpu)
        (Path(root) / f"out{rank}.json").write_text(json.dumps({"mine": mine, "agreed": agreed, "ok": ok,
                                                               "both": both}))
    finally:
        dist.destroy_process_group()


def test_ranks_follow_rank_zeros_view_and_load_only_together(tmp_path):
    from loralens.lens.training.deepspeed_loop import free_port

    for step in (10, 20):
        mark(tmp_path / "rank0", step)
    mark(tmp_path / "rank1", 10)  # rank 1 does not see step 20's marker yet
    mp.start_processes(rank_main, args=(str(tmp_path), free_port()), nprocs=2, start_method="spawn")
    out = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in (0, 1)]
    assert out[0]["mine"] == ["step-0000010", "step-0000020"] and out[1]["mine"] == ["step-0000010"]
    assert out[0]["agreed"] == out[1]["agreed"] == ["step-0000010", "step-0000020"]
    assert out[0]["ok"] is out[1]["ok"] is False
    assert out[0]["both"] is out[1]["both"] is True


def test_without_a_process_group_a_rank_decides_alone(tmp_path):
    assert rank0_object(["x"], torch.device("cpu")) == ["x"]
    assert all_ranks_ok(False, torch.device("cpu")) is False
