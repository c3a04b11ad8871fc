"""Fast reuse and explicit verification: reusing a complete version stats its files (size, mtime) and reads
none; `loralens verify` and `loralens run --verify` re-hash them (sha256) against the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import loralens.warehouse.artifacts as artifacts
from loralens.config import parse_config
from loralens.flows.cli import main
from loralens.hashing import file_sha256
from loralens.tasks.stages.cache import cache_version, run_cache_stage

CORPUS = {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"], "max_prompts_per_file": 6}
CACHE = {"batch_size": 4, "prompts_per_shard": 4, "max_length": 16}
VICTIM = "z/layer=1/shard-00001.parquet"


def cached(tiny_models, home: Path):
    """Cache a tiny gpt2 over 12 prompts (3 shards) without Prefect; return (cfg, ver, summary)."""
    cfg = parse_config({"home": str(home), "model": {"name": str(tiny_models["gpt2"])}, "corpus": CORPUS,
                        "cache": CACHE})
    ver = cache_version(cfg)
    return cfg, ver, run_cache_stage(cfg, ver)


@pytest.fixture()
def hashed(monkeypatch) -> list[Path]:
    """Count the artifact files the warehouse's checksum checks read (the real sha256 still runs)."""
    calls: list[Path] = []

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return file_sha256(path)

    monkeypatch.setattr(artifacts, "file_sha256", counting)
    return calls


def flip_keeping_stat(path: Path) -> None:
    """Flip one byte in place and put the size and mtime back: only a checksum can tell."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def verify(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["verify", *argv])
    return rc, capsys.readouterr().out


def test_cached_rerun_hashes_no_artifact_file(tiny_models, tmp_path, hashed):
    cfg, ver, first = cached(tiny_models, tmp_path)
    assert not first["cached"]
    hashed.clear()  # the first run hashed what it wrote (the writers); reuse must read nothing
    again = run_cache_stage(cfg, ver)
    assert again["cached"] and again["n_tokens"] == first["n_tokens"]
    assert [p for p in hashed if (tmp_path / "artifacts") in p.parents] == []
    # Every record stamps its files' mtimes; the manifest describes content only (same data, same manifest).
    record = json.loads((ver.artifact.path / "_shards" / "shard-00000.json").read_text())
    assert all(isinstance(f["mtime_ns"], int) for f in record["files"])
    assert all("mtime_ns" not in f for f in ver.artifact.manifest()["files"])


def test_flip_with_size_and_mtime_restored_is_found_only_by_verify(tiny_models, tmp_path, capsys):
    cfg, ver, first = cached(tiny_models, tmp_path)
    victim = ver.artifact.path / VICTIM
    original = victim.read_bytes()
    manifest = ver.artifact.manifest()
    flip_keeping_stat(victim)

    assert run_cache_stage(cfg, ver)["cached"]  # quick reuse keeps it: size and mtime are as recorded
    rc, out = verify(capsys, "cache", "--home", str(tmp_path))
    assert rc == 1
    row = next(line for line in out.splitlines() if ver.version in line)
    assert "1 bad file" in row and VICTIM in row and str(len(manifest["files"])) in row
    assert not ver.artifact.is_complete()  # reopened, as a reuse finding it would

    again = run_cache_stage(cfg, ver)
    assert not again["cached"] and again["shards_redone"] == 1 and again["n_tokens"] == first["n_tokens"]
    assert victim.read_bytes() == original
    assert ver.artifact.manifest()["files"] == manifest["files"]  # every file byte-identical to the original
    rc, out = verify(capsys, "--home", str(tmp_path))
    assert rc == 0 and "ok" in next(line for line in out.splitlines() if ver.version in line)


@pytest.mark.parametrize("change", ["rewritten", "resized"])
def test_changed_file_is_redone_on_reuse_without_verify(tiny_models, tmp_path, change):
    cfg, ver, _ = cached(tiny_models, tmp_path)
    victim = ver.artifact.path / VICTIM
    original = victim.read_bytes()
    if change == "rewritten":  # same size, other bytes, a new mtime: the moved mtime makes it compare content
        victim.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])
    else:
        victim.write_bytes(original + b"\0")
    again = run_cache_stage(cfg, ver)
    assert not again["cached"] and again["shards_redone"] == 1
    assert victim.read_bytes() == original


def test_touched_file_is_hashed_once_then_reused_by_stat(tiny_models, tmp_path, hashed):
    """A home copied without timestamps: same bytes, new mtimes. Reuse compares the moved files' content once,
    keeps the version, re-stamps the records; the next reuse hashes nothing."""
    cfg, ver, _ = cached(tiny_models, tmp_path)
    victim = ver.artifact.path / VICTIM
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    hashed.clear()
    assert run_cache_stage(cfg, ver)["cached"]
    assert hashed == [victim]
    hashed.clear()
    assert run_cache_stage(cfg, ver)["cached"]
    assert hashed == []


def test_records_without_mtime_are_reused_by_size(tiny_models, tmp_path, hashed):
    """Versions written before mtimes were recorded still load and are reused (size only), hashing nothing."""
    cfg, ver, _ = cached(tiny_models, tmp_path)
    for rec in (ver.artifact.path / "_shards").glob("*.json"):
        data = json.loads(rec.read_text())
        data["files"] = [{k: v for k, v in f.items() if k != "mtime_ns"} for f in data["files"]]
        rec.write_text(json.dumps(data))
    victim = ver.artifact.path / VICTIM
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    hashed.clear()
    assert run_cache_stage(cfg, ver)["cached"]
    assert hashed == []
    victim.write_bytes(victim.read_bytes()[:-1])  # a size change is still found
    assert run_cache_stage(cfg, ver)["shards_redone"] == 1


def test_verify_without_complete_versions_and_unknown_stage(tmp_path, capsys):
    rc, out = verify(capsys, "--home", str(tmp_path))
    assert rc == 0 and "no complete artifact versions" in out
    assert main(["verify", "nope", "--home", str(tmp_path)]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err


def test_pipeline_verify_rehashes_before_reuse(prefect_server, tiny_models, tmp_path, hashed):
    """`loralens run` reuses by stat; `--verify` (the flow's `verify`) re-hashes every file first and redoes a
    shard whose bytes changed behind restored size and mtime."""
    from loralens.flows.pipeline import pipeline

    config = {"home": str(tmp_path), "model": {"name": str(tiny_models["gpt2"])}, "corpus": CORPUS, "cache": CACHE}
    first = pipeline(config=config, only="cache")["cache"]
    adir = cache_version(parse_config(config)).artifact
    n_files = len(adir.manifest()["files"])
    flip_keeping_stat(adir.path / VICTIM)
    hashed.clear()
    assert pipeline(config=config, only="cache")["cache"]["cached"]
    assert [p for p in hashed if (tmp_path / "artifacts") in p.parents] == []
    verified = pipeline(config=config, only="cache", verify=True)["cache"]
    assert len([p for p in hashed if (tmp_path / "artifacts") in p.parents]) == n_files
    assert not verified["cached"] and verified["shards_redone"] == 1 and verified["version"] == first["version"]
