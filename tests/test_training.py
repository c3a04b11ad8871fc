"""The train stage on a real tiny cache: DeepSpeed (ZeRO 1/2, 1 and 2 processes), resume, fidelity, PEFT."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import torch
from safetensors.torch import load_file

from loralens.config import parse_config
from loralens.lens.lenses.lens_set import FoldedUnembed
from loralens.lens.lenses.peft_io import UnembedLens, export_head_adapter, load_bank
from loralens.tasks.stage_versions import StageVersion
from loralens.tasks.stages.cache import cache_version, run_cache_stage
from loralens.tasks.stages.train import run_train_stage, train_version
from loralens.warehouse.artifacts import ArtifactError
from loralens.warehouse.db import warehouse_path

TRAIN = {"micro_batch_tokens": 64, "epochs": 3, "checkpoint_every": 4, "lr": 1e-2, "zero_stage": 2}


def raw_config(home: Path, model: Path, **train) -> dict:
    return {
        "home": str(home),
        "model": {"name": str(model)},
        "corpus": {"max_prompts_per_file": 40},
        "cache": {"prompts_per_shard": 16, "max_length": 24, "top_k": 16},
        "train": TRAIN | train,
    }


def run_both(raw: dict) -> tuple[dict, StageVersion, StageVersion]:
    cfg = parse_config(raw)
    cache_ver = cache_version(cfg)
    run_cache_stage(cfg, cache_ver)
    ver = train_version(cfg, cache_ver)
    return run_train_stage(cfg, ver, cache_ver), ver, cache_ver


def bank_tensors(ver: StageVersion) -> dict[str, torch.Tensor]:
    return {f"{p.parent.name}/{k}": v for p in sorted((ver.artifact.path / "lenses").glob("*/lens_bank.safetensors"))
            for k, v in load_file(p).items()}


def test_more_processes_than_shards_is_a_one_line_error_before_launch(tiny_models, tmp_path):
    """2 ranks on a 1-shard cache: refused before any process starts, with nothing of the version written."""
    from loralens.config import ConfigError

    raw = raw_config(tmp_path, tiny_models["llama"], world_size=2)
    raw["cache"]["prompts_per_shard"] = 1000  # one shard
    cfg = parse_config(raw)
    cache_ver = cache_version(cfg)
    run_cache_stage(cfg, cache_ver)
    ver = train_version(cfg, cache_ver)
    with pytest.raises(ConfigError, match=r"^config error: train.world_size: 2 processes but the cache has 1 shard"):
        run_train_stage(cfg, ver, cache_ver)
    assert not ver.artifact.path.exists()


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    raw = raw_config(tmp_path_factory.mktemp("home"), tiny_models["llama"])
    summary, ver, cache_ver = run_both(raw)
    return raw, summary, ver, cache_ver


def test_training_lowers_loss_and_beats_logit_lens(trained):
    raw, summary, ver, _ = trained
    assert summary["heads"] == 3 * 4 and summary["steps"] > 10 and not summary["cached"]
    con = duckdb.connect(str(warehouse_path(Path(raw["home"]))), read_only=True)
    losses = [r[0] for r in con.execute("SELECT loss FROM training_curve WHERE version = ? ORDER BY step",
                                        [ver.version]).fetchall()]
    assert len(losses) == -(-summary["steps"] // 10)  # a row per train.log_every (10) steps, and the last step
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0]
    assert summary["tf32"] is False and summary["grad_accum_steps"] == 1  # CPU: no TF32
    assert summary["train_tokens"] == summary["steps"] * 64
    assert set(summary["train_timing"]) == {"read", "compute", "sync", "checkpoint"}
    layers = con.execute("SELECT layer, kl_lens, kl_logit_lens, kl_subset FROM lens_fidelity_by_layer "
                         "WHERE version = ? ORDER BY layer", [ver.version]).fetchall()
    assert [r[0] for r in layers] == [0, 1, 2]
    for _, kl, base, subset in layers:
        assert kl < base  # a trained lens must beat the logit lens on held-out prompts
        assert 0 <= subset <= kl + 1e-6  # the subset KL is a lower bound of the exact KL
    heads = con.execute("SELECT count(*), count(*) FILTER (WHERE kl_lens < kl_logit_lens) FROM lens_fidelity "
                        "WHERE version = ? AND head >= 0", [ver.version]).fetchone()
    assert heads == (12, 12)
    assert (ver.artifact.path / "fidelity_heatmap.png").stat().st_size > 1000
    assert not (ver.artifact.path / "checkpoints").exists()  # consolidated lenses replace them


def test_rerun_is_cached_and_config_change_makes_new_version(trained):
    raw, summary, ver, _ = trained
    again, ver2, _ = run_both(raw)
    assert again["cached"] and ver2.version == ver.version
    other = train_version(parse_config(raw | {"train": TRAIN | {"rank": 2}}), cache_version(parse_config(raw)))
    assert other.version != ver.version
    # execution-only settings do not change the version
    same = train_version(parse_config(raw | {"train": TRAIN | {"checkpoint_every": 99}}),
                         cache_version(parse_config(raw)))
    assert same.version == ver.version
    # a science setting added later is hashed only away from the default that reproduces earlier training
    assert "grad_accum_steps" not in ver.config["train"]
    accum = train_version(parse_config(raw | {"train": TRAIN | {"grad_accum_steps": 2}}),
                          cache_version(parse_config(raw)))
    assert accum.version != ver.version and accum.config["train"]["grad_accum_steps"] == 2


def test_trained_head_loads_with_peft_and_reproduces_bank_logits(trained, tiny_models):
    from peft import PeftModel

    from loralens.lens.runtime.adapters import folded_unembedding
    from loralens.lens.runtime.models import load_model

    raw, _, ver, _ = trained
    loaded = load_model(str(tiny_models["llama"]), Path(raw["home"]))
    unembed = FoldedUnembed(*folded_unembedding(loaded.adapter, loaded.model))
    bank = load_bank(ver.artifact.path / "lenses" / "layer=1", unembed)
    assert bank.lora_B.abs().max() > 0  # really trained
    out = export_head_adapter(bank, 2, ver.artifact.path / "peft-head-2")
    peft_model = PeftModel.from_pretrained(UnembedLens(unembed), str(out))
    x = torch.randn(5, bank.n_heads, bank.d_model)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x[:, 2]), bank.head_logits(x)[:, 2], atol=1e-5, rtol=1e-5)


def test_zero_stage_1_single_process(tiny_models, tmp_path):
    summary, _, _ = run_both(raw_config(tmp_path, tiny_models["gpt2"], zero_stage=1, epochs=1))
    assert summary["world_size"] == 1 and summary["mean_layer_kl"] < summary["mean_layer_kl_logit_lens"]


def test_bf16_lenses_train_and_are_saved_as_fp32_masters(tiny_models, tmp_path):
    """param_dtype bfloat16 (ZeRO-2): the saved banks hold the fp32 master weights, not their bf16 rounding."""
    summary, ver, _ = run_both(raw_config(tmp_path, tiny_models["gpt2"], param_dtype="bfloat16", epochs=1))
    assert summary["mean_layer_kl"] < summary["mean_layer_kl_logit_lens"]
    tensors = bank_tensors(ver)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert any((t != t.bfloat16().float()).any() for t in tensors.values())


@pytest.mark.parametrize(("launcher", "zero_stage"), [("torchrun", 2), ("deepspeed", 3)])
def test_two_process_training_trains_and_result_loads(tiny_models, tmp_path, launcher, zero_stage):
    summary, ver, _ = run_both(raw_config(tmp_path, tiny_models["qwen2"], world_size=2, epochs=2,
                                           launcher=launcher, zero_stage=zero_stage))
    assert summary["world_size"] == 2 and summary["mean_layer_kl"] < summary["mean_layer_kl_logit_lens"]
    # consolidated: loadable in this (single) process with no DeepSpeed involved
    tensors = bank_tensors(ver)
    assert len(tensors) == 3 * 3 and all(torch.isfinite(t).all() for t in tensors.values())


def test_missing_upstream_cache_is_a_clear_error(tiny_models, tmp_path):
    cfg = parse_config(raw_config(tmp_path, tiny_models["llama"]))
    cache_ver = cache_version(cfg)
    with pytest.raises(ArtifactError, match=r"missing upstream artifact: cache version \w+ is not complete"):
        run_train_stage(cfg, train_version(cfg, cache_ver), cache_ver)


RUNNER = """
import json, sys
from loralens.config import parse_config
from loralens.tasks.stages.cache import cache_version
from loralens.tasks.stages.train import train_version, run_train_stage
cfg = parse_config(json.loads(sys.argv[1]))
cp = cache_version(cfg)
run_train_stage(cfg, train_version(cfg, cp), cp)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_training_resumes_from_checkpoint_and_matches_uninterrupted(tiny_models, tmp_path, sig):
    model = tiny_models["gpt_neox"]
    killed = raw_config(tmp_path / "killed", model, epochs=4, checkpoint_every=2)
    clean = raw_config(tmp_path / "clean", model, epochs=4, checkpoint_every=2)
    cfg = parse_config(killed)
    cache_ver = cache_version(cfg)
    run_cache_stage(cfg, cache_ver)
    ver = train_version(cfg, cache_ver)
    ckpts = ver.artifact.path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(killed)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(ckpts.glob("step-*/COMPLETE")):
        time.sleep(0.05)
    os.killpg(proc.pid, sig)  # the task process and the training worker it started
    proc.wait()
    if sig == signal.SIGTERM:  # the worker checkpoints at the next step, then exits on its own
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", str(ver.artifact.path)],
                                                             capture_output=True).returncode == 0:
            time.sleep(0.1)
    assert not ver.artifact.is_complete(), "the kill must land before training finished"

    resumed = run_train_stage(cfg, ver, cache_ver)
    assert resumed["resumed_from"] > 0
    reference, ref_ver, _ = run_both(clean)
    assert ref_ver.version == ver.version and resumed["steps"] == reference["steps"]
    got, want = bank_tensors(ver), bank_tensors(ref_ver)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


def test_a_cache_too_small_for_one_accumulated_step_is_a_one_line_error():
    from loralens.config import ConfigError, TrainConfig
    from loralens.tasks.stages.train import check_enough_tokens

    t = TrainConfig(micro_batch_tokens=64, world_size=2, eval_every_nth_prompt=10)
    check_enough_tokens(t, 200)  # ~180 training tokens: one step of 2 x 64
    with pytest.raises(ConfigError, match=r"^config error: train.micro_batch_tokens: 64 x 2 processes x 2 "
                                          r"micro-batches per step exceeds the ~180 training tokens in the cache$"):
        check_enough_tokens(t.model_copy(update={"grad_accum_steps": 2}), 200)
