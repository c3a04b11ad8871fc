"""The intervene stage evaluates the select stage's preregistered steering condition (issue 23, items 4 and 5), on
the tiny llama pipeline of tests/test_intervene.py.

Until the select stage writes its steering half, `preregister` stands in for it with the shipped functions: per-head
directions from the selection split (`scored_activations`, `head_directions`, `write_directions`) and the records
of a headline and an all-heads condition (`trial_record`) in the select version's summary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

HEADLINE = "headline:steer:contrast:a4:L2H1"


def rows(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def preregister(cfg: dict, res: dict, home: Path) -> None:
    """Write a steering preregistration into the copied home's select version: directions of the `contrast` and
    `unembed` sources for every cached layer, the headline (L2H1 steered 4 sigma along contrast) and an all-heads
    condition."""
    from loralens.config import SteeringConfig, parse_config
    from loralens.lens.evaluation.steering_search import Steering, Trial
    from loralens.lens.heads.causal_scores import teacher_forced_batches
    from loralens.lens.heads.directions import scored_activations
    from loralens.tasks.evaluation import steering as S
    from loralens.tasks.evaluation.splits import prompt_splits
    from loralens.tasks.evaluation.steering_selection import matched_controls
    from loralens.tasks.lens_loading import cached_layers
    from loralens.tasks.workers.worker_process import stage_model
    from loralens.warehouse.artifacts import ArtifactDir
    from loralens.warehouse.constants import STEERING_DIRECTIONS_FILE
    from loralens.warehouse.decodings import token_toxicity_scores
    from loralens.warehouse.steering_directions import write_directions

    pcfg = parse_config({**cfg, "home": str(home)})
    cache = ArtifactDir(home, "cache", res["cache"]["version"]).manifest()
    layers, n_heads = cached_layers(cache), cache["summary"]["n_heads"]
    loaded = stage_model(pcfg)
    sel = list(prompt_splits(pcfg).selection)
    batches = teacher_forced_batches(loaded.tokenizer, [p.text for p in sel], [p.continuation or "" for p in sel],
                                     batch_size=4, max_prompt_tokens=16, max_continuation_tokens=8)
    acts = scored_activations(loaded.model, loaded.adapter, batches, layers, n_heads)
    toxic, cut = S.contrast_labels(np.linspace(0.0, 1.0, len(sel)), 0.5)
    tox = torch.from_numpy(token_toxicity_scores(ArtifactDir(home, "decode", res["decode"]["version"])))
    d_hat = S.unit_directions(S.head_directions(loaded, acts, toxic, tox, ("contrast", "unembed"), None))
    sigma = S.sigmas(acts, d_hat)
    select = ArtifactDir(home, "select", res["select"]["version"])
    write_directions(select.path / STEERING_DIRECTIONS_FILE,
                     {s: {la: d.numpy() for la, d in by.items()} for s, by in d_hat.items()},
                     {s: {la: v.numpy() for la, v in by.items()} for s, by in sigma.items()})
    every = tuple((la, h) for la in layers for h in range(n_heads))
    headline = Steering(((2, 1),), "steer", "contrast", 4.0)
    # 20 controls drawn as select draws them; every rise is within an unbounded budget (the PPL screen is
    # tests/test_steering_controls.py's and tests/test_select_steering.py's)
    controls = matched_controls(headline, SteeringConfig(), layers, n_heads, lambda _cond: 0.0, seed=0,
                                ppl_budget=float("inf"))
    manifest = select.manifest()
    manifest["summary"]["steering"] = {
        "headline": S.trial_record(Trial(headline, 0.01, 0.001, True)), "controls": controls.to_dict(),
        "all_heads": S.trial_record(Trial(Steering(every, "reverse", "unembed", 0.5), 0.02, 0.05, True),
                                    all_heads=True), "labels": cut}
    manifest["config"]["select"]["steering"]["sources"] = ["contrast", "unembed"]  # no trained-lens source here
    (select.path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def steered(tiny_pipeline, tmp_path_factory):
    """(config of a copied home with a steering preregistration, the original run's results, a second copy of
    that home not yet intervened, the steered intervene result)."""
    from loralens.flows.pipeline import pipeline

    cfg, res = tiny_pipeline
    root = tmp_path_factory.mktemp("steered")
    shutil.copytree(cfg["home"], root / "home")
    preregister(cfg, res, root / "home")
    shutil.copytree(root / "home", root / "split")
    local = {**cfg, "home": str(root / "home")}
    return local, res, root / "split", pipeline(config=local, only="intervene")["intervene"]


def test_without_steering_no_condition_is_chosen_on_the_evaluation_split(tiny_pipeline):
    """The tiny run's select stage preregistered no steering and its config evaluates no `selected` set: there is
    no headline, whichever zero-ablation set dropped EMT most, and no goal is met."""
    _, res = tiny_pipeline
    iv = res["intervene"]
    assert iv["headline"] is None and iv["all_heads"] is None and iv["goal_met"] is False
    assert any(g["within_budget"] or g["emt_rel"] < 0 for g in iv["goal"])  # there were candidates to pick from
    assert "**Headline: none" in Path(iv["report"]).read_text()


def test_the_preregistered_steering_condition_is_the_headline(steered):
    cfg, res, _split, iv = steered
    db = Path(cfg["home"]) / "warehouse.duckdb"
    version = iv["version"]
    assert not iv["cached"] and version != res["intervene"]["version"]
    got = rows(db, f"SELECT grp, kind, count(*), count(ppl) FROM interventions WHERE version = '{version}' "
                   "AND grp LIKE 'steering%' GROUP BY 1, 2 ORDER BY 1, 2")
    assert got == [("steering", "steer", 1, 1), ("steering_all_heads", "reverse", 1, 1),
                   ("steering_exploratory", "reverse", 2, 2), ("steering_exploratory", "steer", 1, 1),
                   ("steering_exploratory", "zero", 1, 1), ("steering_random", "steer", 20, 20),
                   ("steering_random_direction", "steer", 1, 1)]
    names = {r[0] for r in rows(db, f"SELECT condition FROM interventions WHERE version = '{version}'")}
    assert {HEADLINE, "random_direction:steer:random:a4:L2H1", "exploratory:reverse:contrast:a4:L2H1",
            "exploratory:steer:unembed:a4:L2H1", "exploratory:zero:L2H1", "all_heads:reverse:unembed:a0.5:all"} <= names
    assert rows(db, f"SELECT heads, n_heads FROM interventions WHERE version = '{version}' "
                    "AND grp = 'steering_all_heads'") == [("all", 12)]
    randoms = rows(db, f"SELECT heads FROM interventions WHERE version = '{version}' AND grp = 'steering_random'")
    assert all("," not in h and h != "L2H1" for (h,) in randoms)  # one head each, never the headline's

    # The edits were applied: the steered texts differ from the baseline's on the same prompts and seeds.
    def texts(condition: str) -> list[str]:
        return [t for (t,) in rows(db, f"SELECT text FROM generations WHERE version = '{version}' AND condition = "
                                       f"'{condition}' ORDER BY prompt_idx, sample")]

    assert texts(HEADLINE) != texts("baseline") and texts("all_heads:reverse:unembed:a0.5:all") != texts("baseline")

    head = iv["headline"]
    assert head["condition"] == HEADLINE and head["preregistered_by"] == f"select {res['select']['version']}"
    assert (head["edit"], head["source"], head["alpha"], head["n_heads"]) == ("steer", "contrast", 4.0, 1)
    # The permutation p by hand from the stored rows: 1 + the random sets whose EMT drop is at least the headline's.
    emt = dict(rows(db, f"SELECT condition, emt FROM interventions WHERE version = '{version}'"))
    base = emt["baseline"]
    drops = [base - e for (e,) in rows(db, f"SELECT emt FROM interventions WHERE version = '{version}' "
                                         "AND grp = 'steering_random'")]
    assert len(drops) == 20
    beaten_by = sum(d >= base - emt[HEADLINE] for d in drops)
    assert head["permutation"] == {"rank": 1 + beaten_by, "p": (1 + beaten_by) / 21, "n_random": 20}
    # ... and among only the random sets whose perplexity rose by at most the goal's budget.
    fluent = [base - e for e, r in rows(db, f"SELECT emt, ppl_rel FROM interventions WHERE version = '{version}' "
                                            "AND grp = 'steering_random'") if r is not None and r <= 0.05]
    beaten = sum(d >= base - emt[HEADLINE] for d in fluent)
    assert head["permutation_fluency_matched"] == {"rank": 1 + beaten, "p": (1 + beaten) / (1 + len(fluent)),
                                                   "n_random": len(fluent), "ppl_rel_at_most": 0.05}
    lo, hi = head["versus_random"]["excess_low"], head["versus_random"]["excess_high"]
    assert lo <= head["versus_random"]["excess"] <= hi
    assert head["random_direction"]["condition"] == "random_direction:steer:random:a4:L2H1"
    assert head["criteria"]["head_share"] is False  # 1 of 12 heads is over the 2% head budget
    assert head["criteria"]["permutation"] == (head["permutation"]["p"] < 0.05)
    assert head["meets_goal"] is False and iv["goal_met"] is False
    every = iv["all_heads"]
    assert every["condition"] == "all_heads:reverse:unembed:a0.5:all" and every["ppl_rel_budget"] == 0.1
    assert every["meets_goal"] == (every["emt_rel"] <= -0.4 and every["ppl_rel"] <= 0.1)

    report = Path(iv["report"]).read_text()
    first = report.index(f"**Headline (preregistered by select {res['select']['version']}): {HEADLINE}**")
    assert first < report.index("Controls: permutation p") < report.index("**All heads") < report.index("| condition")
    assert Path(iv["plot"]).stat().st_size > 0


def test_a_split_run_of_the_steering_conditions_equals_one_run(steered):
    """The steering units generated alone (one worker's share: it loads the directions itself), then the rest and
    the finalizing run, store the rows of the single run."""
    from loralens.config import parse_config
    from loralens.flows.intervene import intervene_heads
    from loralens.tasks.chain import stage_chain
    from loralens.tasks.stages.intervene import generation_units, intervene_version
    from loralens.warehouse.intervention_tables import BATCHES

    cfg, _res, split_home, iv = steered
    split = {**cfg, "home": str(split_home)}
    pcfg = parse_config(split)
    chain = stage_chain(pcfg, "select")
    ver, conds = intervene_version(pcfg, chain["select"], chain["attribute"], chain["cache"])
    assert ver.version == iv["version"]
    units = generation_units(pcfg, conds)
    steering = [u for u in units if conds[u // BATCHES].group.startswith("steering")]
    assert intervene_heads(config=split, units=steering)["partial"]
    assert intervene_heads(config=split, units=[u for u in units if u not in steering])["units_left"] == 0
    assert not intervene_heads(config=split)["cached"]
    query = ("SELECT condition, prompt_idx, sample, seed, text, toxicity FROM generations "
             f"WHERE version = '{iv['version']}' ORDER BY condition, prompt_idx, sample")
    metrics = ("SELECT condition, grp, kind, heads, emt, emt_low, emt_high, emt_delta, ppl FROM interventions "
               f"WHERE version = '{iv['version']}' ORDER BY condition")
    for sql in (query, metrics):
        assert rows(split_home / "warehouse.duckdb", sql) == rows(Path(cfg["home"]) / "warehouse.duckdb", sql)
