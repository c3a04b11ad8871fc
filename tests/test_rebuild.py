"""`loralens rebuild`: the warehouse is an index of the manifests. Deleted, it comes back from the artifacts of a
real pipeline run (tests/conftest.py's `tiny_pipeline`) answering every query as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest

from loralens.flows.cli import main


def warehouse_answers(home: Path, *others: Path) -> dict[str, list[str]]:
    """Return every table's and view's rows (sorted, as JSON text), with paths under `others` read as under `home`.

    `artifacts.created_at` is left out: a rebuilt row cannot know when its run started (it says when the version
    completed); everything else, `completed_at` included, must be the same.
    """
    out = {}
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                           "WHERE table_schema = 'main' ORDER BY 1").fetchall()]
        for name in names:
            cols = [r[0] for r in con.execute(f"DESCRIBE {name}").fetchall() if (name, r[0]) != ("artifacts",
                                                                                                "created_at")]
            quoted = ", ".join(f'"{c}"' for c in cols)  # some are keywords (try, rank)
            rows = con.execute(f"SELECT {quoted} FROM {name}").fetchall()
            text = [json.dumps(row, default=str) for row in rows]
            for other in others:
                text = [t.replace(str(other), str(home)) for t in text]
            out[name] = sorted(text)
    return out


@pytest.fixture
def home_copy(tiny_pipeline, tmp_path) -> tuple[Path, Path]:
    """A copy of the session pipeline's home (its warehouse included): (copy, original)."""
    config, _results = tiny_pipeline
    src = Path(config["home"])
    home = tmp_path / "home"
    shutil.copytree(src, home, ignore=shutil.ignore_patterns("reports", "prefect-results"))
    return home, src


def complete_versions(home: Path) -> int:
    """Return how many versions of the home have their manifest (other tests may add versions to the session home)."""
    return len(list((home / "artifacts").glob("*/*/manifest.json")))


def sql_csv(home: Path, query: str, capsys) -> str:
    assert main(["sql", query, "--home", str(home), "--format", "csv"]) == 0
    return capsys.readouterr().out


QUERIES = ("SELECT * FROM top_toxic_heads ORDER BY ALL",
           "SELECT stage, version, status, rows, bytes, parents FROM artifacts ORDER BY ALL",
           "SELECT condition, emt, ppl_rel FROM interventions ORDER BY ALL",
           "SELECT layer, head, count(*) AS n FROM head_toxic_tokens GROUP BY ALL ORDER BY ALL")


def test_deleted_warehouse_is_rebuilt_answering_every_query_the_same(home_copy, capsys):
    home, src = home_copy
    before = warehouse_answers(home, src)
    answers = [sql_csv(home, q, capsys) for q in QUERIES]
    # Every stage's tables have rows (this run's head budget is 0 and its all-heads claim off: its selection path
    # and steering trials are empty; tests/test_select_steering.py checks the trials' rows).
    assert [t for t in ("artifacts", "prompts", "training_curve", "lens_fidelity", "decodings", "vocab_toxicity",
                        "prompt_groups", "head_scores", "prompt_splits", "steering_scores",
                        "generations", "interventions", "top_toxic_heads", "head_toxic_tokens") if not before[t]] == []
    (home / "warehouse.duckdb").unlink()
    n = complete_versions(home)
    assert n >= 6  # one per stage at least

    assert main(["rebuild", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"warehouse {home / 'warehouse.duckdb'} rebuilt from {n} complete version(s)"
    after = warehouse_answers(home, src)
    assert sorted(after) == sorted(before)
    assert {t: len(rows) for t, rows in after.items()} == {t: len(rows) for t, rows in before.items()}
    assert [t for t in before if after[t] != before[t]] == []
    assert [sql_csv(home, q, capsys) for q in QUERIES] == answers
    assert not list(home.glob(".tmp-*")) and not (home / "warehouse.duckdb.wal").exists()


def test_rebuild_indexes_complete_versions_only_and_replaces_a_live_warehouse(home_copy, capsys):
    """A version without its manifest is not complete, whatever the warehouse said: its rows go. A killed
    rebuild's leftover file is replaced, and the stages' other rows are the same as before."""
    home, src = home_copy
    before = warehouse_answers(home, src)
    interventions = [d for d in (home / "artifacts" / "intervene").iterdir() if (d / "manifest.json").exists()]
    for intervene in interventions:
        (intervene / "manifest.json").unlink()
    n = complete_versions(home)
    (home / ".tmp-warehouse.duckdb").write_bytes(b"left by a killed rebuild")

    assert main(["rebuild", "--home", str(home)]) == 0
    assert f"rebuilt from {n} complete version(s)" in capsys.readouterr().out
    after = warehouse_answers(home, src)
    assert after["generations"] == after["interventions"] == []
    assert {json.loads(r)[0] for r in after["artifacts"]} == {"cache", "train", "decode", "attribute", "select"}
    assert not any(d.name in r for d in interventions for r in after["head_scores"] + after["prompt_splits"])
    for table in ("prompts", "decodings", "training_curve", "lens_fidelity", "vocab_toxicity", "selection_path",
                  "steering_trials", "steering_scores"):
        assert after[table] == before[table], table
    assert main(["status", "--home", str(home)]) == 0
    assert "incomplete" in capsys.readouterr().out  # the folder is still there, for the next run to finish


def test_rebuild_without_artifacts_is_one_line(tmp_path, capsys):
    assert main(["rebuild", "--home", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"loralens: error: no artifacts under {tmp_path}: nothing to rebuild the "
                                       "warehouse from\n")
    assert not (tmp_path / "warehouse.duckdb").exists()
