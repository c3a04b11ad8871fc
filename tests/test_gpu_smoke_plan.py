"""The GPU smoke run's plan, checked on this CPU: every row's config is a valid PipelineConfig, every training rank
gets its own cache shard and at least one optimizer step (from the real tokenizer's token counts), bf16 lenses run
under ZeRO-2/3, rows beyond this machine's GPUs are skipped, and the table and JSON writers work. Running the rows
needs a GPU (`bash benchmarks/gpu_smoke.sh`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_smoke import (
    GpuUseWatch,
    check_rows,
    format_row,
    select_rows,
    smoke_rows,
    write_result,
)
from loralens.config import default_home
from loralens.config.inputs import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    return smoke_rows(work, DEFAULT_MODEL, work / "llama3-8b-2layer")


def test_rows_cover_the_gpu_paths_users_run(rows):
    configs = check_rows(rows)  # every config validates
    paths = {(c.train.world_size, c.train.zero_stage, c.train.param_dtype, c.model.device_map, c.run.workers)
             for c in configs.values()}
    assert paths == {(1, 2, "float32", None, 1), (2, 2, "bfloat16", None, 1), (2, 3, "bfloat16", None, 1),
                     (8, 2, "bfloat16", None, 1), (8, 3, "bfloat16", None, 1), (1, 2, "float32", "auto", 1),
                     (1, 2, "float32", None, 2)}
    for name, c in configs.items():
        assert c.model.device == "cuda" and c.model.dtype == "auto" and c.train.epochs == 1, name
        assert c.train.param_dtype == "float32" or c.train.zero_stage >= 2, name
    by_name = {r.name: r for r in rows}
    assert {r.name for r in rows if r.gpus == 1} == {"default x1", "8b x1"}
    assert by_name["8b device_map auto"].stages == by_name["default dask x2"].stages == (
        "cache", "train", "decode", "attribute", "select", "intervene")


def test_every_training_rank_gets_its_own_shard_and_a_step(rows):
    """The cache's real sharding of the real tokens (SmolLM2's tokenizer, which the 8B-shaped model also uses):
    each rank of each row gets at least one shard, and one full optimizer step per epoch."""
    from transformers import AutoTokenizer

    from loralens.lens.runtime.models import resolve_model_path
    from loralens.lens.training.batches import steps_per_epoch
    from loralens.tasks.stages.cache import cache_inputs
    from loralens.tasks.stages.train import check_enough_shards

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL, default_home()))
    for name, cfg in check_rows(rows).items():
        inputs = cache_inputs(cfg, tokenizer, cfg.cache.max_length)
        world = cfg.train.world_size
        assert len(inputs.shards) >= world, name
        check_enough_shards(cfg.train, len(inputs.shards))
        every = cfg.train.eval_every_nth_prompt
        train_rows = {s: sum(len(inputs.ids[i]) for i in rows_ if i % every) for s, rows_ in enumerate(inputs.shards)}
        assert steps_per_epoch(train_rows, world, cfg.train.micro_batch_tokens) >= 1, name
    dask = check_rows([r for r in rows if r.name == "default dask x2"])["default dask x2"]
    assert len(cache_inputs(dask, tokenizer, dask.cache.max_length).shards) == 2  # a cache unit for each worker


def test_rows_beyond_this_machine_are_skipped(rows):
    assert [r.skip_reason(1) for r in rows] == [None, None] + ["skipped: 1 GPUs here"] * 6
    assert [r.name for r in rows if r.skip_reason(2) is None] == [
        "default x1", "8b x1", "8b x2 zero2 bf16", "8b x2 zero3 bf16", "8b device_map auto", "default dask x2"]
    assert all(r.skip_reason(8) is None for r in rows)
    assert [r.name for r in select_rows(rows, None, skip_8b=True)] == ["default x1", "default dask x2"]
    assert [r.name for r in select_rows(rows, ["8b x1"], skip_8b=False)] == ["8b x1"]
    with pytest.raises(SystemExit, match="no row named 8b x4"):
        select_rows(rows, ["8b x4"], skip_8b=False)


def test_table_and_json(tmp_path):
    with GpuUseWatch(0) as watch:  # no GPU: nothing to watch
        pass
    assert watch.grown is None
    ok = {"row": "8b x1", "stage": "train", "wall_s": 12.5, "gpu_peak_bytes": 3 * 2**30, "gpu_used_bytes": None,
          "tokens_per_s": 1234.4}
    failed = {"row": "8b x2 zero3 bf16", "stage": "train", "wall_s": 3.0, "gpu_peak_bytes": 0,
              "gpu_used_bytes": 2**30, "tokens_per_s": None, "error": "train worker exited 1"}
    skipped = {"row": "8b x8 zero2 bf16", "skipped": "skipped: 1 GPUs here"}
    assert format_row(ok).split() == ["8b", "x1", "train", "12.5", "3.00", "-", "1234"]
    assert format_row(failed).endswith("1.00         -  FAILED: train worker exited 1")
    assert format_row(skipped).split()[-4:] == ["skipped:", "1", "GPUs", "here"]
    out = write_result(tmp_path / "r" / "gpu_smoke.json", [ok, failed, skipped], 60.0, 1, "a GPU")
    assert json.loads((tmp_path / "r" / "gpu_smoke.json").read_text()) == out
    assert out["rows"] == [ok, failed, skipped] and out["gpus"] == 1 and out["device"] == "a GPU"


def test_plan_flag_prints_and_checks_the_rows_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--plan", "--gpus", "2",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert len(lines) == 8 and lines[0].startswith("default x1") and "runs:" in lines[0]
    assert "skipped: 2 GPUs here" in lines[4] and lines[4].startswith("8b x8 zero2 bf16")
    assert "world_size 2, zero_stage 3, param_dtype bfloat16" in proc.stdout
    assert "2 cache shard(s) of 64 prompts" in proc.stdout and "8 cache shard(s) of 64 prompts" in proc.stdout
