"""The intervene stage on a tiny real model: rows written once, re-run skipped, controls drawn reproducibly,
a SIGKILLed run resumes to the same generations as an uninterrupted one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml

INTERVENE = {"max_prompts": 6, "k": 2, "max_new_tokens": 4, "ppl_tokens": 200, "ppl_window": 50, "n_boot": 50,
             "batch_prompts": 2, "head_sets": [{"top_n": 1}, {"top_n": 2}, {"heads": "L0H1"}],
             "random_seeds": [0, 1], "ablation_candidates": 2, "ablation_prompts": 2}


def config(home: Path, model: Path, **intervene) -> dict:
    # Zero-ablation conditions only: with the tiny llama's head budget of 0 and no all-heads claim, the select
    # stage preregisters no steering condition (tests/test_intervene_steering.py covers those).
    return {"home": str(home), "model": {"name": str(model)}, "select": {"steering": {"all_heads": False}},
            "corpus": {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"], "max_prompts_per_file": 6},
            "cache": {"batch_size": 4, "prompts_per_shard": 4, "max_length": 16},
            "train": {"micro_batch_tokens": 32, "epochs": 1},
            "intervene": {**INTERVENE, **intervene}}


def n_generations(conditions: int, ablations: int) -> int:
    return conditions * INTERVENE["max_prompts"] * INTERVENE["k"] + (ablations + 1) * 2 * 2


@pytest.fixture(scope="module")
def run(tiny_pipeline):
    return tiny_pipeline  # conftest.py: one pipeline run of `config` on the tiny llama, shared with test_scale_out


def rows(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_stage_writes_every_condition_once_and_rerun_is_skipped(run):
    from loralens.flows.pipeline import pipeline

    cfg, res = run
    iv = res["intervene"]
    db = Path(cfg["home"]) / "warehouse.duckdb"
    # baseline + 3 attributed + random (sizes 1 and 2) x 2 seeds; ablation baseline + 2 single heads
    names = [r[0] for r in rows(db, "SELECT condition FROM interventions ORDER BY condition")]
    assert len(names) == 1 + 3 + 4 + 3
    assert {"baseline", "top1:lens_contrast", "top2:lens_contrast", "list:L0H1", "random1:s0", "random2:s1",
            "ablation:baseline"} <= set(names)
    assert iv["generations"] == n_generations(8, 2)
    count = f"SELECT count(*) FROM generations WHERE version = '{iv['version']}'"
    assert rows(db, count)[0][0] == iv["generations"]
    assert rows(db, "SELECT count(*) FROM head_scores WHERE method = 'ablation'")[0][0] == 2
    assert rows(db, "SELECT count(*) FROM interventions WHERE ppl IS NULL")[0][0] == 3  # ablation rows only
    base = rows(db, "SELECT emt, emt_delta, emt_rel FROM interventions WHERE condition = 'baseline'")[0]
    assert base[1] == 0 and base[2] == 0
    assert Path(iv["report"]).read_text().count("| random") == 4 and Path(iv["plot"]).stat().st_size > 0

    report = Path(iv["run_report"]).read_text()
    for section in ("## Stages", "## Lens fidelity", "## Head toxicity", "## Interventions", "## Config"):
        assert section in report
    assert "| intervene |" in report and "toxicity_vs_ppl.png" in report

    again = pipeline(config=cfg)
    assert all(r["cached"] for r in again.values())
    assert again["intervene"]["run_report"] != iv["run_report"]  # one report file per pipeline run
    assert rows(db, count)[0][0] == iv["generations"]


def test_random_controls_are_reproducible_and_avoid_attributed_heads(run):
    from loralens.config import parse_config
    from loralens.tasks.chain import stage_chain
    from loralens.tasks.stages.intervene import intervene_version

    cfg = parse_config(run[0])
    chain = stage_chain(cfg, "select")
    cache, attribute = chain["cache"], chain["attribute"]
    ver_a, conds_a = intervene_version(cfg, chain["select"], attribute, cache)
    ver_b, conds_b = intervene_version(cfg, chain["select"], attribute, cache)
    assert ver_a.version == ver_b.version == run[1]["intervene"]["version"] and conds_a == conds_b
    attributed = {h for c in conds_a if c.group == "attributed" for h in c.heads}
    randoms = [c for c in conds_a if c.group == "random"]
    assert randoms and all(not set(c.heads) & attributed for c in randoms)
    assert {c.heads for c in randoms if len(c.heads) == 1} != {()}  # two seeds give two sets
    assert len({c.heads for c in randoms if len(c.heads) == 2}) == 2


@pytest.mark.parametrize("kind", ["mean", "project"])
def test_other_intervention_kinds_complete(run, kind, tmp_path):
    from loralens.flows.pipeline import pipeline

    cfg = {**run[0], "intervene": {**run[0]["intervene"], "kind": kind, "random_seeds": [0],
                                   "ablation_candidates": 0, "head_sets": [{"top_n": 2}]}}
    res = pipeline(config=cfg, only="intervene")["intervene"]
    assert not res["cached"] and res["kind"] == kind and res["version"] != run[1]["intervene"]["version"]
    assert res["generations"] == 3 * INTERVENE["max_prompts"] * INTERVENE["k"]


def test_sigkill_mid_generation_then_resume_equals_uninterrupted(run, tmp_path):
    cfg, res = run
    home = tmp_path / "home"
    shutil.copytree(cfg["home"], home)
    iv_dir = Path(res["intervene"]["path"].replace(cfg["home"], str(home)))
    shutil.rmtree(iv_dir)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({**cfg, "home": str(home)}))
    cmd = [sys.executable, "-m", "loralens.flows.cli", "run", "--config", str(cfg_file), "--only", "intervene"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gen_dir = iv_dir / "generations"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if gen_dir.is_dir() and len(list(gen_dir.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(gen_dir.glob("*.parquet")))
    assert not (iv_dir / "manifest.json").exists()
    assert 3 <= done_before < 30

    from loralens.flows.pipeline import pipeline

    resumed = pipeline(config={**cfg, "home": str(home)}, only="intervene")["intervene"]
    assert not resumed["cached"] and resumed["version"] == res["intervene"]["version"]
    version = res["intervene"]["version"]
    query = ("SELECT condition, prompt_idx, sample, seed, text, toxicity FROM generations "
             f"WHERE version = '{version}' ORDER BY condition, prompt_idx, sample")
    assert rows(home / "warehouse.duckdb", query) == rows(Path(cfg["home"]) / "warehouse.duckdb", query)
    metrics = f"SELECT condition, emt, emt_low, emt_high, ppl FROM interventions WHERE version = '{version}' ORDER BY 1"
    assert rows(home / "warehouse.duckdb", metrics) == rows(Path(cfg["home"]) / "warehouse.duckdb", metrics)


def intervene_rows(cfg: dict, res: dict) -> tuple[str, str, tuple]:
    """Return (generations query, metrics query, their rows) of the run's intervene version."""
    version = res["intervene"]["version"]
    query = ("SELECT condition, prompt_idx, sample, seed, text, toxicity FROM generations "
             f"WHERE version = '{version}' ORDER BY condition, prompt_idx, sample")
    metrics = f"SELECT condition, emt, emt_low, emt_high, ppl FROM interventions WHERE version = '{version}' ORDER BY 1"
    db = Path(cfg["home"]) / "warehouse.duckdb"
    return query, metrics, (rows(db, query), rows(db, metrics))


def homes_without_intervene(cfg: dict, res: dict, tmp_path: Path, names: tuple[str, ...]) -> list[Path]:
    """Return copies of the run's home, one per name, each without its intervene version's folder."""
    homes = []
    for name in names:
        home = tmp_path / name
        shutil.copytree(cfg["home"], home)
        shutil.rmtree(Path(res["intervene"]["path"].replace(cfg["home"], str(home))))
        homes.append(home)
    return homes


def test_generation_split_over_workers_equals_one_run(run, dask_cluster, tmp_path):
    """Generation units mapped over 2 Dask worker processes, and disjoint `units` lists as separate runs, give the
    same rows as one process."""
    from loralens.flows.intervene import intervene_heads

    cfg, res = run
    version = res["intervene"]["version"]
    query, metrics, want = intervene_rows(cfg, res)

    homes = homes_without_intervene(cfg, res, tmp_path, ("mapped", "split"))
    from loralens.flows.pipeline import pipeline

    mapped = pipeline(config={**cfg, "home": str(homes[0])}, only="intervene",
                      dask_address=dask_cluster.scheduler_address)["intervene"]
    assert not mapped["cached"] and mapped["version"] == version

    split = {**cfg, "home": str(homes[1])}
    first = intervene_heads(config=split, units=[0, 1, 2])
    assert first["partial"] and first["units_done"] == 3 and first["units_left"] == first["n_units"] - 3
    assert not (homes[1] / "artifacts" / "intervene" / version / "manifest.json").exists()
    from loralens.config import parse_config
    from loralens.tasks.chain import stage_chain
    from loralens.tasks.stages.intervene import generation_units, intervene_version

    pcfg = parse_config(split)
    chain = stage_chain(pcfg, "select")
    _, conds = intervene_version(pcfg, chain["select"], chain["attribute"], chain["cache"])
    rest = [u for u in generation_units(pcfg, conds) if u not in (0, 1, 2)]
    assert intervene_heads(config=split, units=rest)["units_left"] == 0
    final = intervene_heads(config=split)
    assert not final["cached"] and final["seconds_setup"] == 0  # nothing left to generate: no model loaded
    for home in homes:
        db = home / "warehouse.duckdb"
        assert (rows(db, query), rows(db, metrics)) == want


def test_batch_size_changes_neither_the_version_nor_a_sample(run, tmp_path):
    """intervene.batch_prompts is an execution setting: a fresh run with batches of 4 prompts, and a run started
    with batches of 2 and resumed with batches of 3 (it keeps its first units), store the version and rows of the
    run with batches of 2."""
    from loralens.flows.intervene import intervene_heads
    from loralens.flows.pipeline import pipeline

    cfg, res = run
    version = res["intervene"]["version"]
    query, metrics, want = intervene_rows(cfg, res)
    homes = homes_without_intervene(cfg, res, tmp_path, ("fresh", "resumed"))

    def with_batch(home: Path, n: int) -> dict:
        return {**cfg, "home": str(home), "intervene": {**cfg["intervene"], "batch_prompts": n}}

    fresh = pipeline(config=with_batch(homes[0], 4), only="intervene")["intervene"]
    assert not fresh["cached"] and fresh["version"] == version
    first = intervene_heads(config=with_batch(homes[1], 2), units=[0, 1])
    assert first["partial"] and first["units_done"] == 2
    resumed = intervene_heads(config=with_batch(homes[1], 3))
    assert not resumed["cached"] and resumed["version"] == version
    assert resumed["generations"] == res["intervene"]["generations"]
    for home in homes:
        db = home / "warehouse.duckdb"
        assert (rows(db, query), rows(db, metrics)) == want


def test_files_corrupted_after_completion_are_redone_on_reuse(run, tmp_path):
    """A lens file, a head-score file and a generation shard flipped after their versions completed: the next
    run redoes train and attribute (whole versions) and the one generation batch, and ends byte-identical."""
    import json

    from loralens.flows.pipeline import pipeline

    cfg, res = run
    home = tmp_path / "home"
    shutil.copytree(cfg["home"], home)
    local = {**cfg, "home": str(home)}

    def manifest(stage: str) -> dict:
        return json.loads((Path(res[stage]["path"].replace(cfg["home"], str(home))) / "manifest.json").read_text())

    before = {stage: sorted((f["path"], f["sha256"]) for f in manifest(stage)["files"])
              for stage in ("train", "attribute", "intervene")}
    for stage, pick in (("train", "lens_bank.safetensors"), ("attribute", "head_scores.parquet"),
                        ("intervene", "generations/")):
        rel = next(p for p, _ in before[stage] if pick in p)
        path = Path(res[stage]["path"].replace(cfg["home"], str(home))) / rel
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    again = pipeline(config=local)
    assert again["cache"]["cached"] and again["decode"]["cached"]
    assert not again["train"]["cached"] and not again["attribute"]["cached"] and not again["intervene"]["cached"]
    for stage, files in before.items():
        assert sorted((f["path"], f["sha256"]) for f in manifest(stage)["files"]) == files
    assert all(r["cached"] for r in pipeline(config=local).values())


def test_evaluation_prompts_are_held_out_from_the_cache_corpus_and_the_selection(tmp_path):
    from loralens.config import ConfigError, parse_config
    from loralens.tasks.evaluation.splits import prompt_splits
    from loralens.tasks.stages.intervene import evaluation_prompts
    from loralens.warehouse.corpus import load_corpus
    from loralens.warehouse.prompt_splits import text_fraction

    cfg = parse_config(config(tmp_path, tmp_path))
    cached = {p.text for p in load_corpus(cfg.corpus.paths, cfg.corpus.max_prompts_per_file).prompts}
    held = [p.text for p in evaluation_prompts(cfg).prompts]
    every = [p.text for p in load_corpus(cfg.intervene.prompts).prompts]
    selection = {p.text for p in prompt_splits(cfg).selection}
    assert len(held) == INTERVENE["max_prompts"] and not set(held) & cached and not set(held) & selection
    unseen = [t for t in dict.fromkeys(every) if t not in cached and text_fraction(t) >= 0.5]
    assert held == unseen[: INTERVENE["max_prompts"]]  # the first unseen evaluation-split prompts, in order
    inside = parse_config({**config(tmp_path, tmp_path), "intervene": {**INTERVENE, "held_out": False}})
    assert [p.text for p in evaluation_prompts(inside).prompts] == [
        t for t in dict.fromkeys(every) if text_fraction(t) >= 0.5][: INTERVENE["max_prompts"]]
    only_cached = parse_config({**config(tmp_path, tmp_path),
                                "corpus": {"paths": ["bundled:rtp_toxic_dev"], "max_prompts_per_file": None}})
    with pytest.raises(ConfigError, match="intervene.prompts: no prompt left for the evaluation split"):
        evaluation_prompts(only_cached)


def test_head_sets_from_sql_and_lists_resolve_and_bad_ones_are_config_errors(run):
    from loralens.config import ConfigError, parse_config
    from loralens.tasks.chain import stage_chain
    from loralens.tasks.evaluation.conditions import ranked_heads
    from loralens.tasks.stages.intervene import intervene_version

    def conditions(head_sets: list[dict]):
        cfg = parse_config({**run[0], "intervene": {**INTERVENE, "head_sets": head_sets}})
        chain = stage_chain(cfg, "select")
        cache, attribute = chain["cache"], chain["attribute"]
        return attribute, intervene_version(cfg, chain["select"], attribute, cache)

    sql = "SELECT layer, head FROM head_scores WHERE method = 'direct_logit' AND rank <= 2"
    attribute, (ver, conds) = conditions([{"sql": sql, "name": "dla2"}, {"heads": "L2H3 1.0"}])
    by = {c.name: c for c in conds}
    assert set(by["dla2"].heads) == set(ranked_heads((attribute,), "direct_logit")[:2])
    assert by["list:L1H0,L2H3"].heads == ((1, 0), (2, 3))
    for bad, message in (([{"sql": "SELEC 1"}], "head_sets.sql"), ([{"sql": "SELECT 1 AS x"}], "(layer, head)"),
                         ([{"heads": "L9H0"}], "not among"), ([{"heads": "L1Hx"}], "head_sets.0.heads"),
                         ([{"top_n": 1, "method": "nope"}], "method 'nope'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            conditions(bad)
