"""`loralens run` finds every error the config and this machine reveal before Prefect starts (tasks/preflight.py):
one line, the last and only one printed, exit 2, no Prefect server, no flow run, nothing written in the home."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from loralens.config import parse_config

CORPUS = {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"], "max_prompts_per_file": 6}
CACHE = {"batch_size": 4, "prompts_per_shard": 4, "max_length": 16}
TRAIN = {"micro_batch_tokens": 16, "epochs": 1}


def tiny_config(home: Path, model: Path, **sections) -> dict:
    """Return a tiny pipeline config of `model` under `home`, with `sections` laid over its cache/train sections."""
    base = {"home": str(home), "model": {"name": str(model)}, "corpus": CORPUS, "cache": CACHE, "train": TRAIN}
    return base | {k: base.get(k, {}) | v for k, v in sections.items()}


def run_cli(tmp_path: Path, config: dict | str, *argv: str, env: dict | None = None) -> tuple[list[str], int, float]:
    """Run `loralens run --config CONFIG ARGV` in a fresh process with no Prefect server to talk to (a flow run would
    start a temporary one, saying so); return its non-empty output lines (stdout, then stderr), exit code, seconds."""
    path = tmp_path / "run.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | (env or {})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "loralens.flows.cli", "run", "--config", str(path), *argv],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return lines, proc.returncode, time.monotonic() - t0


@pytest.fixture(scope="module")
def plain_error_seconds(tmp_path_factory) -> float:
    """Seconds a plain config error takes through the CLI (it stops before torch is imported)."""
    lines, rc, seconds = run_cli(tmp_path_factory.mktemp("plain"), "train:\n  zero_stage: 7\n")
    assert rc == 2 and len(lines) == 1, lines
    return seconds


def assert_stopped_before_prefect(lines: list[str], rc: int, seconds: float, plain: float, home: Path,
                                  *fragments: str) -> None:
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("loralens: error: "), lines  # the last line and the only one
    assert not any("prefect" in ln.lower() or "Stopping temporary server" in ln for ln in lines), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (home / "artifacts").exists() and not (home / "warehouse.duckdb").exists()
    # Imports (torch, transformers) and reading the model's config; a Prefect server's start alone takes ~10 s.
    assert seconds < plain + 15, (seconds, plain)


def test_only_train_without_its_cache_names_the_cache(tiny_models, tmp_path, plain_error_seconds):
    home = tmp_path / "home"
    lines, rc, seconds = run_cli(tmp_path, tiny_config(home, tiny_models["llama"]), "--only", "train")
    assert_stopped_before_prefect(lines, rc, seconds, plain_error_seconds, home, "missing upstream artifact: cache "
                                  "version", "is not complete; run `loralens run --only cache` first")


def test_more_ranks_than_the_cache_will_have_shards_stops_before_the_cache_runs(tiny_models, tmp_path,
                                                                                plain_error_seconds):
    """A whole run: train's ranks are counted against the shards the cache stage will write, before it writes any."""
    home = tmp_path / "home"
    config = tiny_config(home, tiny_models["llama"], cache={"prompts_per_shard": 64}, train={"world_size": 2})
    lines, rc, seconds = run_cli(tmp_path, config)
    assert_stopped_before_prefect(lines, rc, seconds, plain_error_seconds, home,
                                  "config error: train.world_size: 2 processes but the cache has 1 shard(s)")


def test_a_later_stage_that_cannot_fit_stops_the_run_before_its_first_stage(tiny_models, tmp_path,
                                                                            plain_error_seconds):
    """Memory for just the cache stage: the first later stage that needs more is named, with the device, and the
    cache stage never runs."""
    from loralens.tasks.memory import predict
    from loralens.tasks.registry import stage_names

    home = tmp_path / "home"
    config = tiny_config(home, tiny_models["llama"])
    cfg = parse_config(config)

    def peak(stage: str) -> int:
        return max(predict(cfg, s).total for s in ((stage, "eval") if stage == "train" else (stage,)))

    limit = peak("cache")
    over = [s for s in stage_names()[1:] if peak(s) > limit]
    assert over, "no stage needs more than the cache: the test cannot tell a look-ahead check"
    lines, rc, seconds = run_cli(tmp_path, config, env={"LORALENS_MEMORY_LIMIT": str(limit)})
    assert_stopped_before_prefect(lines, rc, seconds, plain_error_seconds, home,
                                  f"loralens: error: {over[0]} stage will not fit in memory: predicted peak",
                                  "on the host; to fit, lower")


@pytest.mark.parametrize("missing", ["model", "text"])
def test_a_missing_model_folder_or_text_file_stops_before_prefect(tiny_models, tmp_path, plain_error_seconds,
                                                                  missing):
    home = tmp_path / "home"
    gone = tmp_path / "gone"
    if missing == "model":
        config = tiny_config(home, gone)
        fragment = f"unknown model '{gone}': no such folder"
    else:
        config = tiny_config(home, tiny_models["llama"], corpus={"text_paths": [str(gone / "text.txt")]})
        fragment = str(gone / "text.txt")
    lines, rc, seconds = run_cli(tmp_path, config, "--only", "cache")
    assert_stopped_before_prefect(lines, rc, seconds, plain_error_seconds, home, fragment)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has CUDA: DeepSpeed detects it")
def test_deepspeed_prints_no_accelerator_warning_on_a_cpu_machine():
    """DeepSpeed, imported (here by accelerate when a model is saved) on a machine without CUDA, prints nothing:
    the device module pins its accelerator to the CPU, in the environment the training processes inherit."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = ("import os\nimport loralens.lens.runtime.devices\nimport deepspeed\n"
            "print(os.environ['DS_ACCELERATOR'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "cpu\n" and "accelerator" not in proc.stderr.lower(), (proc.stdout, proc.stderr)


def test_only_the_stages_that_will_run_are_checked(tiny_models, tmp_path, monkeypatch):
    """A complete version is reused as it is: its memory and inputs are not checked (`--force` checks them); train
    counts its ranks against the complete cache's shards; `--only train` needs the cache complete."""
    from loralens.config import ConfigError
    from loralens.flows.common import pin_dtype
    from loralens.lens.memory.stage_memory import MemoryBudgetError
    from loralens.tasks.preflight import preflight
    from loralens.tasks.stages.cache import cache_version, run_cache_stage
    from loralens.warehouse.artifacts import ArtifactError

    cfg = pin_dtype(parse_config(tiny_config(tmp_path / "home", tiny_models["gpt2"], train={"world_size": 2})))
    with pytest.raises(ArtifactError, match="missing upstream artifact: cache version"):
        preflight(cfg, "train")
    ver = cache_version(cfg)
    run_cache_stage(cfg, ver)  # 12 prompts, 4 per shard: 3 shards
    preflight(cfg, "train")
    monkeypatch.setenv("LORALENS_MEMORY_LIMIT", "1M")
    preflight(cfg, "cache")  # complete: nothing of it runs
    with pytest.raises(MemoryBudgetError, match="^cache stage will not fit in memory"):
        preflight(cfg, "cache", force=True)
    with pytest.raises(MemoryBudgetError, match="^train stage will not fit in memory"):
        preflight(cfg, "train")
    monkeypatch.delenv("LORALENS_MEMORY_LIMIT")
    wide = pin_dtype(parse_config(tiny_config(tmp_path / "home", tiny_models["gpt2"], train={"world_size": 4})))
    with pytest.raises(ConfigError, match="train.world_size: 4 processes but the cache has 3 shard"):
        preflight(wide, "train")
