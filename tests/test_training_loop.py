"""The DeepSpeed lens loop on a tiny synthetic LensSet (real DeepSpeed on gloo, in spawned processes): gradient
accumulation, curve rows read once per logging interval, checkpoints by wall time, TF32 off on CPU, and the
held-out evaluation split over ranks equal to one process's."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from loralens.lens.lenses.lens_set import FoldedUnembed, LensConfig
from loralens.lens.lenses.objective import LensSet
from loralens.lens.training.batches import ShardData
from loralens.lens.training.checkpoints import complete_checkpoints
from loralens.lens.training.deepspeed_loop import TrainSpec, free_port, tf32_matmuls
from loralens.lens.training.held_out import held_out_fidelity

V, D, H, DH, L = 48, 16, 2, 8, 1
SHARDS, ROWS, EVERY = 4, 40, 5  # prompt_idx % 5 == 0 held out: 8 of each shard's 40 rows


def lens_set(trained: bool = False) -> LensSet:
    """A seeded tiny LensSet (exact loss); `trained`: a nonzero lora_B, as after training."""
    g = torch.Generator().manual_seed(0)
    unembed = FoldedUnembed(torch.randn(V, D, generator=g) / D**0.5)
    w_o = torch.randn(L, H, DH, D, generator=g) / DH**0.5
    lm_head = torch.randn(V, D, generator=g) / D**0.5
    torch.manual_seed(1)
    out = LensSet(unembed, w_o, [0], LensConfig(form="lora", rank=2, alpha=4.0), lm_head=lm_head, chunk=8)
    if trained:
        with torch.no_grad():
            for bank in out.banks:
                bank.lora_B.normal_(0.0, 0.3, generator=g)
    return out


def loader(shard: int) -> ShardData:
    """Shard `shard`: head outputs whose final hidden state is a fixed linear map of their sum (learnable)."""
    g = np.random.default_rng([7, shard])
    z = g.standard_normal((ROWS, L, H * DH)).astype(np.float16)
    mix = np.random.default_rng(99).standard_normal((H * DH, D)).astype(np.float32) / 2
    return ShardData(z=z.view(np.uint16), scale=np.ones(ROWS, np.float32),
                     h_final=z[:, 0].astype(np.float32) @ mix, topk_ids=None, topk_logprobs=None,
                     prompt_idx=(np.arange(ROWS) // 2 + 100 * shard).astype(np.int32))


def train_rows() -> dict[int, int]:
    return {s: int((loader(s).prompt_idx % EVERY != 0).sum()) for s in range(SHARDS)}


def spec(**kw) -> TrainSpec:
    base = dict(shards=list(range(SHARDS)), train_rows=train_rows(), store_dtype="float16", micro_batch=8, epochs=1,
                max_steps=None, lr=5e-2, weight_decay=0.0, zero_stage=2, seed=0, every=EVERY, checkpoint_every=10**6,
                log_every=1, checkpoint_minutes=None)
    return TrainSpec(**(base | kw))


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from loralens.lens.training.deepspeed_loop import init_distributed, setup_process_env

    setup_process_env(torch.device("cpu"))
    init_distributed(torch.device("cpu"))


def train_main(rank: int, world: int, root: str, port: int, runs: list[dict]) -> None:
    """Run `runs` (TrainSpec overrides + a checkpoint folder) one after another; write what each did."""
    from loralens.lens.training.deepspeed_loop import train

    _init(rank, world, port)
    cpu = torch.device("cpu")
    results = []
    for run in runs:
        rows: list[dict] = []
        precision = torch.get_float32_matmul_precision()
        result, engine = train(lens_set(), loader, spec(**run["spec"]), Path(root) / run["ckpt"], device=cpu,
                               on_log=lambda step, loss, tokens: rows.append(  # noqa: B023
                                   {"step": step, "loss": loss, "tokens": tokens}))
        results.append(asdict(result) | {"curve": rows, "precision": [precision,
                                                                        torch.get_float32_matmul_precision()]})
        del engine
    if rank == 0:
        (Path(root) / "results.json").write_text(json.dumps(results))


def run_ranks(tmp_path: Path, runs: list[dict], world: int = 1) -> list[dict]:
    mp.start_processes(train_main, args=(world, str(tmp_path), free_port(), runs), nprocs=world,
                       start_method="spawn")
    return json.loads((tmp_path / "results.json").read_text())


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory):
    """The same tokens (2 epochs) with 1 and 2 micro-batches per optimizer step, a row per optimizer step, and a
    run with a row per 3 optimizer steps."""
    root = tmp_path_factory.mktemp("accum")
    return run_ranks(root, [{"spec": {"epochs": 2}, "ckpt": "n1"},
                            {"spec": {"epochs": 2, "grad_accum": 2}, "ckpt": "n2"},
                            {"spec": {"epochs": 2, "log_every": 3}, "ckpt": "log3"}])


def test_gradient_accumulation_halves_the_optimizer_steps_and_the_loss_still_falls(accumulation_runs):
    n1, n2, _ = accumulation_runs
    micro_per_epoch = sum(train_rows().values()) // 8  # one rank: every shard's training rows, 8 per micro-batch
    assert n1["steps"] == 2 * micro_per_epoch and n2["steps"] == n1["steps"] // 2
    assert n2["tokens_per_rank"] == n1["tokens_per_rank"] == n1["steps"] * 8  # the same tokens
    assert [r["step"] for r in n2["curve"]] == list(range(1, n2["steps"] + 1))
    assert {r["tokens"] for r in n2["curve"]} == {16}  # a row: one optimizer step of 2 micro-batches
    for run in (n1, n2):
        losses = [r["loss"] for r in run["curve"]]
        assert all(math.isfinite(x) for x in losses)
        assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    # one update from the mean gradient of micro-batches 1-2 is not two updates: the trajectories part
    assert n2["curve"][1]["loss"] != pytest.approx((n1["curve"][2]["loss"] + n1["curve"][3]["loss"]) / 2, rel=1e-4)


def test_a_curve_row_averages_the_logging_interval(accumulation_runs):
    n1, _, log3 = accumulation_runs
    steps = n1["steps"]
    assert log3["steps"] == steps
    assert [r["step"] for r in log3["curve"]] == [*range(3, steps + 1, 3), *([steps] if steps % 3 else [])]
    assert sum(r["tokens"] for r in log3["curve"]) == steps * 8  # every micro-batch in exactly one row
    # the same trajectory, read every 3 steps: a row is the mean of the per-step rows it covers
    per_step = [r["loss"] for r in n1["curve"]]
    for row in log3["curve"]:
        first = (row["step"] - 1) // 3 * 3
        want = per_step[first : row["step"]]
        assert row["loss"] == pytest.approx(sum(want) / len(want), rel=1e-5)


def test_cpu_run_records_tf32_off_and_leaves_the_matmul_precision_alone(accumulation_runs):
    for run in accumulation_runs:
        assert run["tf32"] is False
        assert run["precision"][0] == run["precision"][1]
        assert set(run["timing"]) == {"read", "compute", "sync", "checkpoint"}
        assert all(v >= 0 for v in run["timing"].values()) and run["timing"]["compute"] > 0
    with tf32_matmuls(True, torch.device("cpu")) as on:
        assert on is False


def test_wall_clock_checkpoints_with_step_checkpoints_off_and_resume_from_one(tmp_path):
    # 2 ranks, 2 micro-batches per step (4 steps per epoch), 7 steps, a sync point every 2: the clock (due at once)
    # checkpoints at steps 2, 4 and 6, the end at 7
    clock = {"epochs": 3, "max_steps": 7, "log_every": 2, "checkpoint_minutes": 1e-9, "grad_accum": 2}
    first = run_ranks(tmp_path, [{"spec": clock, "ckpt": "clock"},
                                 {"spec": clock | {"checkpoint_minutes": None}, "ckpt": "steps"}], world=2)
    assert [r["steps"] for r in first] == [7, 7]
    assert [s for s, _ in complete_checkpoints(tmp_path / "clock")] == [6, 7]  # the 2 newest kept
    assert [s for s, _ in complete_checkpoints(tmp_path / "steps")] == [7]  # checkpoint_every=10**6: the end only
    shutil.rmtree(tmp_path / "clock" / "step-0000007")
    resumed = run_ranks(tmp_path, [{"spec": clock | {"max_steps": 9}, "ckpt": "clock"}], world=2)[0]
    assert resumed["resumed_from"] == 6 and resumed["steps"] == 9  # mid-epoch, on an accumulation boundary
    assert resumed["tokens_per_rank"] == 3 * 2 * 8
    assert [r["step"] for r in resumed["curve"]] == [8, 9]
    assert [r["tokens"] for r in resumed["curve"]] == [2 * 2 * 2 * 8, 2 * 2 * 8]  # steps x micro-batches x ranks x 8


def eval_main(rank: int, world: int, root: str, port: int) -> None:
    _init(rank, world, port)
    fid = held_out_fidelity(lens_set(trained=True), loader, list(range(SHARDS)), every=EVERY, micro_batch=5,
                            store_dtype="float16", device=torch.device("cpu"))
    (Path(root) / f"fid{rank}.json").write_text(json.dumps(fid))


def test_held_out_evaluation_split_over_two_ranks_equals_one_process(tmp_path):
    alone = held_out_fidelity(lens_set(trained=True), loader, list(range(SHARDS)), every=EVERY, micro_batch=5,
                              store_dtype="float16", device=torch.device("cpu"))
    assert alone["tokens"] == SHARDS * 8
    assert alone["layer_lens"][0] != pytest.approx(alone["layer_logit_lens"][0])  # the lens is not the logit lens
    mp.start_processes(eval_main, args=(2, str(tmp_path), free_port()), nprocs=2, start_method="spawn")
    split = [json.loads((tmp_path / f"fid{r}.json").read_text()) for r in (0, 1)]
    assert split[0] == split[1]  # every rank gets the all-reduced result
    assert split[0]["tokens"] == alone["tokens"] and split[0]["layers"] == alone["layers"]
    for key in ("head_lens", "head_logit_lens", "layer_lens", "layer_logit_lens", "layer_subset_kl"):
        np.testing.assert_allclose(split[0][key], alone[key], rtol=1e-5, atol=1e-7)
