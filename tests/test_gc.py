"""`loralens gc`: which versions are garbage, dry run by default, and removal of folders and warehouse rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from loralens.flows.cli import main
from loralens.warehouse import gc
from loralens.warehouse.artifacts import ArtifactDir, ShardFile
from loralens.warehouse.db import upsert_artifact, warehouse_path, write_transaction

T0 = 1_700_000_000.0  # completion times are set explicitly so "newest" does not depend on the clock

# stage, version, parents, minutes after T0 (completion, or last change when incomplete), complete
LAYOUT = [
    ("cache", "c0", [], 0, True),  # unreferenced and not the newest cache: garbage
    ("cache", "c1", [], 1, True),  # older than c2, but the parent of the newest train: kept
    ("cache", "c2", [], 5, True),  # newest cache: kept
    ("cache", "cx", [], 2, False),  # incomplete, older than c2: kept unless --include-incomplete
    ("train", "t1", ["c1"], 2, True),  # only decode d0 (garbage) uses it: garbage
    ("train", "t2", ["c1"], 3, True),  # newest complete train: kept
    ("train", "t3", ["c2"], 6, False),  # incomplete, the stage's newest attempt: always kept
    ("decode", "d0", ["t1"], 3, True),
    ("decode", "d1", ["t2"], 4, True),
]
# Rows per version in a table with a `version` column, by stage.
ROWS = {"cache": "prompts", "train": "training_curve", "decode": "decodings"}


def make_version(home: Path, stage: str, version: str, parents: list[str], minutes: int, complete: bool) -> None:
    """Write a fake artifact folder (one data file, a shard record, manifest unless incomplete) + its rows."""
    adir = ArtifactDir(home, stage, version)
    adir.prepare()
    data = adir.path / "data.bin"
    data.write_bytes(os.urandom(1000))
    adir.record_shard(0, [ShardFile("data.bin", 1, 1000, "-")])
    when = T0 + 60 * minutes
    if complete:
        inputs = {p[0]: p for p in parents} or {"model": "fp-model", "corpus": "fp-corpus"}
        adir.finalize(config={}, inputs=inputs, summary={})
        manifest = json.loads((adir.path / "manifest.json").read_text())
        (adir.path / "manifest.json").write_text(json.dumps(manifest | {"completed_at": when}))
    for p in [adir.path, *adir.path.rglob("*")]:
        os.utime(p, (when, when))
    db = warehouse_path(home)
    upsert_artifact(db, stage=stage, version=version, parents=parents or ["fp-model", "fp-corpus"], config={},
                    status="complete" if complete else "running", artifact_dir=str(adir.path))
    write_transaction(db, lambda con: insert_rows(con, stage, version))


def insert_rows(con: duckdb.DuckDBPyConnection, stage: str, version: str) -> None:
    if stage == "cache":
        con.execute("INSERT INTO prompts (version, prompt_idx, text) VALUES (?, 0, 'a'), (?, 1, 'b')",
                    [version, version])
    elif stage == "train":
        con.execute("INSERT INTO training_curve VALUES (?, 1, 0.5, 10), (?, 2, 0.4, 20)", [version, version])
    else:
        con.execute("INSERT INTO decodings VALUES (?, 0, 0, 0, 0, 0, 'trained', 1, 5, 'x', 1.0, 0.5)", [version])


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gc-template")
    for row in LAYOUT:
        make_version(root, *row)
    # Registered, but its folder was deleted by hand: only rows to remove.
    upsert_artifact(warehouse_path(root), stage="decode", version="gone", parents=["t1"], config={},
                    status="complete")
    (root / "prefect-results").mkdir()
    (root / "prefect-results" / "result-1").write_text("{}")
    return root


@pytest.fixture()
def home(template, tmp_path) -> Path:
    """A fresh copy of the template home (copytree keeps the modification times that order attempts)."""
    return Path(shutil.copytree(template, tmp_path / "home"))


def on_disk(home: Path) -> set[str]:
    return {p.name for p in (home / "artifacts").glob("*/*")}


def rows_by_version(home: Path) -> dict[str, int]:
    with duckdb.connect(str(warehouse_path(home)), read_only=True) as con:
        out: dict[str, int] = {}
        for table in ("artifacts", "prompts", "training_curve", "decodings"):
            for version, n in con.execute(f"SELECT version, count(*) FROM {table} GROUP BY version").fetchall():
                out[version] = out.get(version, 0) + n
        return out


def test_finds_unreferenced_versions_and_keeps_parents_of_kept_ones(home):
    found = {g.version: g for g in gc.find_garbage(home)}
    assert set(found) == {"c0", "t1", "d0", "gone"}
    assert found["c0"].reason == gc.REASON_SUPERSEDED and found["c0"].bytes > 1000
    assert found["gone"].reason == gc.REASON_NO_FOLDER and not found["gone"].on_disk
    # --include-incomplete adds the incomplete cache, but never the stage's newest attempt (t3).
    with_incomplete = {g.version: g.reason for g in gc.find_garbage(home, include_incomplete=True)}
    assert with_incomplete == {v: g.reason for v, g in found.items()} | {"cx": gc.REASON_INCOMPLETE}
    # Two kept per stage: t1 and d0 stay, and so does everything they descend from.
    assert {g.version for g in gc.find_garbage(home, keep_latest=2)} == {"c0", "gone"}


def test_dry_run_lists_and_deletes_nothing(home, capsys):
    disk, rows = on_disk(home), rows_by_version(home)
    assert main(["gc", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    for version in ("c0", "t1", "d0", "gone"):
        assert version in out
    assert "would remove 4 item(s)" in out and "--yes" in out
    assert "c1" not in out.split()  # kept: the parent of the newest train
    assert on_disk(home) == disk and rows_by_version(home) == rows


def test_yes_removes_exactly_the_garbage_folders_and_rows(home, capsys):
    before = rows_by_version(home)
    assert main(["gc", "--home", str(home), "--yes"]) == 0
    out = capsys.readouterr().out
    assert "removed 4 item(s)" in out
    assert on_disk(home) == {"c1", "c2", "cx", "t2", "t3", "d1"}
    after = rows_by_version(home)
    assert set(after) == set(before) - {"c0", "t1", "d0", "gone"}
    assert all(after[v] == before[v] for v in after)
    assert (home / "prefect-results" / "result-1").exists()
    assert not list((home / "artifacts").glob("*/.trash-*"))
    assert main(["gc", "--home", str(home), "--yes"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_include_incomplete_removes_stale_incomplete_folder(home):
    assert main(["gc", "--home", str(home), "--yes", "--include-incomplete"]) == 0
    assert on_disk(home) == {"c1", "c2", "t2", "t3", "d1"}
    assert "cx" not in rows_by_version(home)


def test_killed_removal_leaves_only_trash_and_next_gc_finishes_it(home, monkeypatch, capsys):
    def killed(path):
        raise KeyboardInterrupt  # as if the process died mid-delete

    monkeypatch.setattr(gc.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["gc", "--home", str(home), "--yes"])
    monkeypatch.undo()
    # The victim is no longer under its version name, so nothing half-deleted can pass for a version.
    assert "c0" not in on_disk(home)
    assert [p.name.startswith(".trash-c0-") for p in (home / "artifacts" / "cache").glob(".trash-*")] == [True]
    capsys.readouterr()
    assert main(["gc", "--home", str(home), "--yes"]) == 0
    assert gc.REASON_TRASH in capsys.readouterr().out
    assert on_disk(home) == {"c1", "c2", "cx", "t2", "t3", "d1"}


def test_version_tables_come_from_information_schema(home):
    def add_table(con):
        con.execute("CREATE TABLE later_stage_rows (version VARCHAR, text VARCHAR)")
        con.execute("INSERT INTO later_stage_rows VALUES ('d0', 'x'), ('d1', 'y')")

    write_transaction(warehouse_path(home), add_table)
    result = gc.collect_garbage(home, gc.find_garbage(home))
    assert result.rows["later_stage_rows"] == 1 and result.rows["artifacts"] == 4
    assert "top_toxic_heads" not in result.rows  # a view, not a table
    with duckdb.connect(str(warehouse_path(home)), read_only=True) as con:
        assert con.execute("SELECT version FROM later_stage_rows").fetchall() == [("d1",)]


HOLD_LOCK = "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('locked', flush=True); time.sleep(60)"


def test_locked_warehouse_is_one_line_error_and_removes_nothing(home, capsys):
    disk = on_disk(home)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(warehouse_path(home))], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        assert main(["gc", "--home", str(home), "--yes", "--wait", "0.3"]) == 2
        assert time.monotonic() - t0 < 10
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.startswith("loralens: error: warehouse") and "locked by another writer" in err
    assert err.count("\n") == 1
    assert on_disk(home) == disk


def test_bad_keep_latest_and_empty_home(tmp_path, capsys):
    assert main(["gc", "--home", str(tmp_path), "--keep-latest", "0"]) == 2
    assert "--keep-latest must be at least 1" in capsys.readouterr().err
    assert main(["gc", "--home", str(tmp_path)]) == 0
    assert "nothing to remove" in capsys.readouterr().out
