"""A forced re-run that fails or is killed keeps what was there: the complete version is set aside (a
`.replaced-<version>` sibling) while --force rebuilds it, deleted only once the new one is complete, and put back
when the rebuild raises, or by the next run when it was killed."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from loralens.config import ConfigError, parse_config
from loralens.flows.cli import main
from loralens.tasks.stage_versions import replaced_path
from loralens.tasks.stages.cache import cache_version, run_cache_stage
from loralens.warehouse.db import warehouse_path

CORPUS = {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"], "max_prompts_per_file": 6}
CACHE = {"batch_size": 4, "prompts_per_shard": 4, "max_length": 16}
TRAIN = {"micro_batch_tokens": 32, "epochs": 1}


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under a version folder, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def status_of(home: Path, version: str) -> str | None:
    with duckdb.connect(str(warehouse_path(home)), read_only=True) as con:
        row = con.execute("SELECT status FROM artifacts WHERE version = ?", [version]).fetchone()
    return row and row[0]


def leftovers(home: Path) -> list[str]:
    """Dot-folders (backups, trash) beside the versions."""
    return sorted(p.name for p in home.glob("artifacts/*/.*") if p.is_dir())


def cache_cfg(home: Path, model: Path):
    return parse_config({"home": str(home), "model": {"name": str(model)}, "corpus": CORPUS, "cache": CACHE})


@pytest.fixture()
def cached(tiny_models, tmp_path):
    """A complete cache version of a private copy of the tiny gpt2 (so a case may break the model)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["gpt2"], model)
    cfg = cache_cfg(tmp_path / "home", model)
    ver = cache_version(cfg)
    run_cache_stage(cfg, ver)
    return cfg, ver, files_of(ver.artifact.path)


def test_forced_cache_failing_after_set_aside_restores_the_old_version(cached):
    cfg, ver, before = cached
    weights = next(Path(cfg.model.name).glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")  # the model breaks after planning: loading raises
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises; what matters is what is left
        run_cache_stage(cfg, ver, force=True)
    assert files_of(ver.artifact.path) == before, "the complete version changed"
    assert leftovers(cfg.home) == []
    again = run_cache_stage(cfg, ver)  # reused as it was, without the (broken) model
    assert again["cached"] and files_of(ver.artifact.path) == before
    assert status_of(cfg.home, ver.version) == "complete"


def test_hand_made_killed_rebuild_is_restored_by_the_next_run(cached, capsys):
    """What a SIGKILL mid-rebuild leaves: the old version under its backup name beside a partial folder."""
    cfg, ver, before = cached
    adir = ver.artifact
    backup = replaced_path(adir)
    adir.path.rename(backup)
    partial = adir.path / "tokens"
    partial.mkdir(parents=True)
    (partial / "shard-00000.parquet").write_bytes(b"half")
    assert main(["status", "--home", str(cfg.home)]) == 0
    out = capsys.readouterr().out
    assert ".replaced-" not in out and "incomplete" in out  # a backup is not a version
    again = run_cache_stage(cfg, ver)
    assert again["cached"] and files_of(adir.path) == before and not backup.exists()
    assert status_of(cfg.home, ver.version) == "complete"


def killed_forced_cache(cfg, point: str) -> int:
    """Run a forced cache stage in a fresh process (its own process group) killed at `point`; return its rc."""
    code = ("import sys; from loralens.config import parse_config; "
            "from loralens.tasks.stages.cache import cache_version, run_cache_stage; "
            "cfg = parse_config({'home': sys.argv[1], 'model': {'name': sys.argv[2]}, "
            f"'corpus': {CORPUS!r}, 'cache': {CACHE!r}}}); "
            "run_cache_stage(cfg, cache_version(cfg), force=True)")
    env = {**os.environ, "LORALENS_KILL_AT": point}
    proc = subprocess.run([sys.executable, "-c", code, str(cfg.home), cfg.model.name], env=env,
                          start_new_session=True, capture_output=True, text=True, timeout=300)
    return proc.returncode


@pytest.mark.parametrize("then_force", [False, True], ids=["then-run", "then-force-again"])
def test_sigkilled_forced_rebuild_keeps_the_old_version(cached, then_force):
    cfg, ver, before = cached
    rc = killed_forced_cache(cfg, "cache.after_record:1")  # the new version has one shard, then the kill
    assert rc == -signal.SIGKILL
    backup = replaced_path(ver.artifact)
    assert files_of(backup) == before and not ver.artifact.is_complete()
    again = run_cache_stage(cfg, ver, force=then_force)
    assert again["cached"] is not then_force  # the old version back, or (forced again) rebuilt from scratch
    assert again.get("shards_redone", 0) == 0
    after = files_of(ver.artifact.path)
    if not then_force:
        assert after == before
    # Rebuilt, the data files are byte-identical (records and manifest carry their own write times).
    data = lambda files: {k: v for k, v in files.items() if k.endswith(".parquet")}  # noqa: E731
    assert data(after) == data(before) and len(data(before)) == 15
    assert leftovers(cfg.home) == [] and status_of(cfg.home, ver.version) == "complete"


def test_forced_train_that_fails_keeps_the_complete_version(tiny_models, tmp_path, caplog):
    """Train forced with a launch that cannot start (a hostfile naming a host that does not exist: its world size,
    1, is the version's; the host is not part of it)
    fails after setting the old version aside; it comes back byte-identical and is reused, registered complete.
    A forced run whose input check fails (too few cached tokens) touches nothing at all."""
    from loralens.tasks.stages.train import run_train_stage, train_version

    base = {"home": str(tmp_path / "home"), "model": {"name": str(tiny_models["llama"])}, "corpus": CORPUS,
            "cache": CACHE, "train": TRAIN}
    cfg = parse_config(base)
    cache_ver = cache_version(cfg)
    run_cache_stage(cfg, cache_ver)
    ver = train_version(cfg, cache_ver)
    run_train_stage(cfg, ver, cache_ver)
    before = files_of(ver.artifact.path)

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("no-such-host.invalid slots=1\n")
    broken = parse_config(base | {"train": TRAIN | {"hostfile": str(hostfile)}})
    assert train_version(broken, cache_ver) == ver  # the same version
    with (caplog.at_level(logging.WARNING, "loralens.stage_versions"),
          pytest.raises(RuntimeError, match="training failed .*the previous complete version is kept")):
        run_train_stage(broken, ver, cache_ver, force=True)
    assert "the previous complete version is back" in caplog.text  # it was set aside, then restored
    assert files_of(ver.artifact.path) == before and leftovers(cfg.home) == []

    too_big = parse_config(base | {"train": TRAIN | {"micro_batch_tokens": 10**6}})
    big_ver = train_version(too_big, cache_ver)
    big_ver.artifact.path.mkdir(parents=True)
    shutil.copytree(ver.artifact.path, big_ver.artifact.path, dirs_exist_ok=True)  # a complete version of it
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        run_train_stage(too_big, big_ver, cache_ver, force=True)
    assert files_of(big_ver.artifact.path) == before and leftovers(cfg.home) == []

    again = run_train_stage(cfg, ver, cache_ver)
    assert again["cached"] and files_of(ver.artifact.path) == before
    assert status_of(cfg.home, ver.version) == "complete"


def test_forced_split_run_rebuilds_or_keeps_the_old_version(prefect_server, dask_cluster, cached):
    """--force with --workers: the old version is set aside once for all workers; a rebuild whose workers fail
    puts it back, one that completes replaces it."""
    from prefect import flow

    from loralens.flows.cache import cache_stage as stage
    from loralens.flows.common import scale_out

    cfg, ver, before = cached

    address = dask_cluster.scheduler_address  # (the flow below is pickled to the workers: no cluster object in it)

    def on_workers(cfg, ver, **kw):
        with scale_out(dask_address=address):  # the shards run on 2 Dask worker processes
            return stage(cfg, ver, **kw)

    def cache_stage(cfg, ver, **kw):  # the stage inside a flow (mapped workers need one), on the given version
        return flow(name="split-cache")(lambda: on_workers(cfg, ver, **kw))()
    data = lambda files: {k: v for k, v in files.items() if k.endswith(".parquet")}  # noqa: E731
    completed = ver.artifact.manifest()["completed_at"]
    cache_stage(cfg, ver, force=True, workers=2)  # the workers rebuild it (and the last one finalizes)
    assert ver.artifact.manifest()["completed_at"] > completed
    assert data(files_of(ver.artifact.path)) == data(before)
    assert leftovers(cfg.home) == []
    now = files_of(ver.artifact.path)
    next(Path(cfg.model.name).glob("*.safetensors")).write_bytes(b"broken")  # every worker's model load fails
    with pytest.raises(Exception):  # noqa: B017 - the loader's error, through the worker tasks
        cache_stage(cfg, ver, force=True, workers=2)
    assert files_of(ver.artifact.path) == now and leftovers(cfg.home) == []
    assert cache_stage(cfg, ver, workers=2)["cached"]
