"""Head-wise steering in the select stage, on the planted-toxic-head pipeline run (tests/test_attribution.py,
`planted_run`, default `select.steering`): the directions file, the trials and first-order tables in the version
folder and in DuckDB, the preregistration in the summary, the probe as a head score, the report; and the select
version (hence the preregistered headline) does not move when only evaluation-split prompts change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_attribution import planted_challenges, planted_corpus

from loralens.config import parse_config
from loralens.lens.heads.head_sets import parse_head_list
from loralens.tasks.evaluation.splits import prompt_splits
from loralens.tasks.evaluation.steering import condition_from_record
from loralens.tasks.evaluation.steering_selection import probe_split
from loralens.tasks.stage_versions import StageVersion
from loralens.tasks.stages.select import select_version
from loralens.warehouse.constants import (
    SELECT_REPORT,
    STEERING_DIRECTIONS_FILE,
    STEERING_SCORES_FILE,
    STEERING_TRIALS_FILE,
)
from loralens.warehouse.steering_directions import read_directions

N_LAYERS, N_HEADS = 3, 4  # the planted tiny llama


def query(db: Path, sql: str, *args) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(args)).fetchall()


def test_select_writes_directions_trials_and_scores_and_preregisters(planted_run):
    config, results, db = planted_run
    sel = results["select"]
    out = Path(sel["path"])
    steering = sel["steering"]
    sources, edits, budget = steering["sources"], steering["edits"], steering["head_budget"]
    assert set(sources) <= {"contrast", "unembed", "lens"} and {"unembed", "lens"} <= set(sources)
    assert edits == ["steer", "reverse"] and budget == sel["budget_heads"] == 1
    assert steering["selection_prompts"] == sel["selection_prompts"] == 8
    assert 0 < steering["toxic_continuations"] < 8 and steering["labels"] in (">= 0.5", "median")
    assert {"activations", "directions", "probe", "first_order", "search", "all_heads"} <= set(steering["seconds"])

    d_hat, sigma = read_directions(out / STEERING_DIRECTIONS_FILE)
    assert sorted(d_hat) == sorted(sigma) == sorted(sources)
    for source in sources:
        assert sorted(d_hat[source]) == list(range(N_LAYERS)), source
        for layer, d in d_hat[source].items():
            assert d.dtype == np.float32 and d.shape == (N_HEADS, 16)
            np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, rtol=1e-5)
            assert sigma[source][layer].shape == (N_HEADS,) and (sigma[source][layer] > 0).all(), (source, layer)

    trials = pq.read_table(out / STEERING_TRIALS_FILE).to_pylist()
    head_sets = [t for t in trials if t["kind"] == "head_set"]
    every = [t for t in trials if t["kind"] == "all_heads"]
    # sizes (1, 2, 4) cut to the head budget (1) x 3 alphas, per (source, edit); all heads: 4 alphas each
    assert len(head_sets) == len(sources) * 2 * 3 and len(every) == len(sources) * 2 * 4
    assert all(t["n_heads"] == 1 for t in head_sets) and all(t["heads"] == "all" for t in every)
    assert all(t["version"] == sel["version"] for t in trials)
    headline = steering["headline"]
    if headline is None:
        assert not any(t["chosen"] for t in head_sets)
        assert not any(t["within_budget"] and t["proxy_drop"] > 0 for t in head_sets)
    else:
        assert headline["within_budget"] and headline["ppl_rel"] <= config["goal"].get("ppl_rel", 0.05)
        assert headline["n_heads"] <= budget and len(parse_head_list(headline["heads"])) == headline["n_heads"]
        chosen = [t for t in head_sets if t["chosen"]]
        assert [t["name"] for t in chosen] == [headline["name"]]
        assert headline["proxy_drop"] == max(t["proxy_drop"] for t in head_sets if t["within_budget"])
    every_head = [(la, h) for la in range(N_LAYERS) for h in range(N_HEADS)]
    if steering["all_heads"] is not None:
        rec = steering["all_heads"]
        assert rec["heads"] == "all" and rec["within_budget"]
        assert len(condition_from_record(rec, every_head).heads) == N_LAYERS * N_HEADS
        assert [t["name"] for t in every if t["chosen"]] == [rec["name"]]

    scores = pq.read_table(out / STEERING_SCORES_FILE).to_pylist()
    assert len(scores) == len(sources) * 2 * N_LAYERS * N_HEADS
    assert {(r["source"], r["edit"]) for r in scores} == {(s, e) for s in sources for e in edits}

    # the same rows in DuckDB, loaded with the stage's other tables
    n_trials = query(db, "SELECT count(*), count(*) FILTER (WHERE chosen) FROM steering_trials WHERE version = ?",
                     sel["version"])[0]
    assert n_trials == (len(trials), (headline is not None) + (steering["all_heads"] is not None))
    assert query(db, "SELECT count(*) FROM steering_scores WHERE version = ?", sel["version"])[0][0] == len(scores)

    # the probe is a head score like the others: ranked best first, AUROC in [0, 1]
    probe = query(db, "SELECT score, rank FROM head_scores WHERE version = ? AND method = 'probe_auroc' "
                      "ORDER BY rank", sel["version"])
    assert len(probe) == N_LAYERS * N_HEADS and all(0 <= s <= 1 for s, _ in probe)
    assert [s for s, _ in probe] == sorted((s for s, _ in probe), reverse=True) and probe[0][1] == 1
    assert "probe_auroc" in sel["methods"] and "probe_auroc" in sel["top_heads"]

    report = (out / SELECT_REPORT).read_text()
    assert "## Steering" in report and f"budget {budget}" in report
    assert report.count("| head_set |") == len(head_sets) and report.count("| all_heads |") == len(every)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["steering"] == json.loads(json.dumps(steering))


def test_steering_off_writes_none_of_it(planted_run, tmp_path):
    from loralens.flows.select import select_heads

    config, results, _db = planted_run
    home = tmp_path / "home"
    shutil.copytree(config["home"], home)
    off = select_heads(config={**config, "home": str(home),
                               "select": {**config["select"], "steering": {"enabled": False}}})
    assert off["version"] != results["select"]["version"] and not off["cached"]
    assert off["steering"] is None and "probe_auroc" not in off["methods"]
    out = Path(off["path"])
    assert not [f for f in (STEERING_DIRECTIONS_FILE, STEERING_TRIALS_FILE, STEERING_SCORES_FILE)
                if (out / f).exists()]
    assert "Off (`select.steering.enabled: false`)" in (out / SELECT_REPORT).read_text()
    db = home / "warehouse.duckdb"
    assert query(db, "SELECT count(*) FROM steering_trials WHERE version = ?", off["version"]) == [(0,)]
    # the head budget and the greedy selection are the steering run's: steering only adds
    assert off["selected"] == results["select"]["selected"]


def test_probe_split_is_stratified_and_alternates():
    train, test = probe_split(np.array([True, False, True, True, False, False, False]))
    assert train.tolist() == [0, 1, 3, 5] and test.tolist() == [2, 4, 6]


def rewrite(path: Path, folder: Path, change) -> Path:
    """Write `path`'s RealToxicityPrompts records to a file of the same name (prompt ids name the file) in
    `folder`, each passed through `change(record)`."""
    rows = [change(json.loads(line)) for line in path.read_text().splitlines()]
    folder.mkdir()
    out = folder / path.name
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_select_version_ignores_the_evaluation_split(tmp_path):
    """Changing only evaluation-split prompts (their continuations and scores) keeps the select version, hence
    its preregistered headline; changing a selection prompt's continuation does not."""
    challenges = Path(planted_challenges(tmp_path))
    base = {"home": str(tmp_path / "home"), "corpus": {"paths": planted_corpus(tmp_path)},
            "select": {"max_prompts": 8}, "intervene": {"max_prompts": 4}}

    def cfg(path: Path):
        return parse_config({**base, "intervene": {**base["intervene"], "prompts": [str(path)]}})

    splits = prompt_splits(cfg(challenges))
    evaluation = {p.text for p in splits.evaluation}
    selection = {p.text for p in splits.selection}
    assert len(evaluation) == 4 and len(selection) == 8

    def edit_texts(texts):
        def change(r):
            if r["prompt"]["text"] in texts:
                r["continuation"]["text"] += " changed"
                r["prompt"]["toxicity"] = 0.01
            return r
        return change

    eval_changed = rewrite(challenges, tmp_path / "eval_changed", edit_texts(evaluation))
    sel_changed = rewrite(challenges, tmp_path / "sel_changed", edit_texts({next(iter(selection))}))
    assert [p.continuation for p in prompt_splits(cfg(eval_changed)).evaluation] != [
        p.continuation for p in splits.evaluation]
    attribute = StageVersion("attribute", "0" * 16, {}, {}, tmp_path)
    versions = [select_version(cfg(p), attribute).version for p in (challenges, eval_changed, sel_changed)]
    assert versions[0] == versions[1] != versions[2]


@pytest.mark.parametrize("key", ["alphas", "sources", "all_heads_ppl_rel"])
def test_the_steering_section_is_versioned(tmp_path, key):
    values = {"alphas": [2.0], "sources": ["unembed"], "all_heads_ppl_rel": 0.2}
    attribute = StageVersion("attribute", "0" * 16, {}, {}, tmp_path)
    base = {"home": str(tmp_path), "corpus": {"paths": planted_corpus(tmp_path)},
            "intervene": {"prompts": [planted_challenges(tmp_path)], "max_prompts": 4}}
    a = select_version(parse_config(base), attribute)
    b = select_version(parse_config({**base, "select": {"steering": {key: values[key]}}}), attribute)
    assert a.version != b.version


def test_intervene_evaluates_the_condition_select_preregistered(planted_run):
    """End to end (one pipeline run): the intervene stage's headline is exactly the condition the select stage
    preregistered on the selection split, evaluated against the random head sets preregistered with it (each within
    the PPL budget under the same edit), with the random-direction control and the all-heads condition beside it."""
    _config, results, db = planted_run
    pre = results["select"]["steering"]
    assert pre["headline"] is not None  # the planted head is worth steering within the one-head budget
    assert tuple(parse_head_list(pre["headline"]["heads"])) == ((1, 2),)  # PLANTED in tests/test_attribution.py
    iv = results["intervene"]
    head = iv["headline"]
    assert head["preregistered_by"] == f"select {results['select']['version']}"
    assert head["condition"] == f"headline:{pre['headline']['name']}"
    groups = dict(query(db, "SELECT grp, count(*) FROM interventions WHERE version = ? GROUP BY grp", iv["version"]))
    controls = pre["controls"]
    assert len(controls["random_sets"]) == 20 and controls["draws"] >= 20
    assert all(r["ppl_rel"] <= controls["ppl_budget"] for r in controls["random_sets"])
    assert all(r["ppl_rel"] > controls["ppl_budget"] for r in controls["rejected"])
    assert groups["steering"] == 1 and groups["steering_random"] == 20 and groups["steering_random_direction"] == 1
    random_heads = query(db, "SELECT heads FROM interventions WHERE version = ? AND grp = 'steering_random'",
                         iv["version"])
    assert sorted(h for (h,) in random_heads) == sorted(r["heads"] for r in controls["random_sets"])
    assert groups.get("steering_all_heads", 0) == (pre["all_heads"] is not None)
    (kind,) = query(db, "SELECT DISTINCT kind FROM interventions WHERE version = ? AND grp = 'steering_random'",
                    iv["version"])
    assert kind == (pre["headline"]["edit"],)
