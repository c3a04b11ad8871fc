"""The Python API, `loralens inspect` and the quickstart on a home made by one real pipeline run of the tiny model
with a planted toxic head (the attribution tests' model): decode equals the decode stage, ablate equals the
intervene stage, inspect names the planted head's toxic token, and its user errors are one line (exit 2)."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from test_attribution import PLANTED, TOXIC_WORD

import loralens
from loralens.flows.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
HEAD = f"L{PLANTED[0]}H{PLANTED[1]}"


@pytest.fixture(scope="module")
def planted_home(planted_run):
    """The home of the session's planted-head pipeline run (tests/conftest.py): (config, results, home path)."""
    config, results, _db = planted_run
    return config, results, Path(config["home"])


def test_home_tables_and_versions(planted_home):
    _config, results, path = planted_home
    home = loralens.open(path)
    assert home.latest("train") == results["train"]["version"]
    assert set(home.versions().column("stage").to_pylist()) == {"cache", "train", "decode", "attribute", "select",
                                                                 "intervene"}
    top = home.head_scores(method="lens_contrast").to_pylist()[0]
    assert (top["layer"], top["head"], top["rank"]) == (*PLANTED, 1)
    methods = set(home.head_scores().column("method").to_pylist())  # the attribute and the select versions'
    assert methods == {"lens_contrast", "logit_lens_contrast", "lens_mean", "dictionary_count", "direct_logit",
                       "ablation_tox_drop", "attribution_patching", "probe_auroc"}
    causal = home.head_scores(method="ablation_tox_drop").to_pylist()[0]
    assert (causal["layer"], causal["head"], causal["version"]) == (*PLANTED, results["select"]["version"])
    conditions = home.interventions().column("condition").to_pylist()
    assert "baseline" in conditions and any(c.startswith("top1:") for c in conditions)
    with pytest.raises(loralens.ApiError, match="unknown stage 'nope'"):
        home.versions("nope")


def test_decode_equals_what_the_decode_stage_stored(planted_home):
    """Same prompt, heads and position: the API's top tokens and probabilities are the stored decodings."""
    _config, results, path = planted_home
    home = loralens.open(path)
    prompt = home.sql("SELECT prompt_idx, text FROM prompts WHERE NOT truncated ORDER BY prompt_idx LIMIT 1")
    idx, text = prompt["prompt_idx"][0].as_py(), prompt["text"][0].as_py()
    stored = home.sql("SELECT position, layer, head, lens, rank, token_id, token, prob FROM decodings "
                      "WHERE version = ? AND prompt_idx = ? ORDER BY position, layer, head, lens DESC, rank",
                      [results["decode"]["version"], idx]).to_pylist()
    lenses = home.lenses()
    got = lenses.decode(text, k=5, position="last").table.to_pylist()
    assert len(got) == len(stored) == 12 * 2 * 5  # heads x lenses x k
    key = ("position", "layer", "head", "lens", "rank", "token_id", "token")
    assert [tuple(r[c] for c in key) for r in got] == [tuple(r[c] for c in key) for r in stored]
    np.testing.assert_allclose([r["prob"] for r in got], [r["prob"] for r in stored], rtol=1e-4, atol=1e-6)
    # The per-head readouts (expected token toxicity under each lens, direct logit attribution) too.
    import pyarrow.parquet as pq

    readouts = pq.read_table(Path(results["decode"]["path"]) / "readouts", filters=[("prompt_idx", "=", idx)])
    stored_reads = {(r["layer"], r["head"]): r for r in readouts.to_pylist()}
    assert len(stored_reads) == 12
    for r in got:
        want = stored_reads[(r["layer"], r["head"])]
        assert r["position"] == want["position"]
        assert r["expected_toxicity"] == pytest.approx(want[f"{r['lens']}_tox"], rel=1e-4, abs=1e-7)
        assert r["direct_logit"] == pytest.approx(want["dla"], rel=1e-4, abs=1e-6)
    # One head at every position: the last row block is the same as above.
    one = lenses.decode(text, heads=HEAD, k=5)
    assert one.table.num_rows == len(one.tokens) * 2 * 5
    assert one.top(PLANTED) == [(r["token"], r["prob"]) for r in got
                                if (r["layer"], r["head"], r["lens"]) == (*PLANTED, "trained")]


def test_ablate_equals_the_intervene_stage(planted_home):
    """Sampling under `loralens.ablate` on the stage's prompt batches gives the texts the stage stored for its
    top-1 condition; no heads leaves the logits bit-identical."""
    from loralens.config import parse_config
    from loralens.lens.evaluation.generation import generate_joint, prompt_batches

    config, results, path = planted_home
    cfg = parse_config(config)
    ic = cfg.intervene
    home = loralens.open(path)
    cond = next(r for r in home.interventions().to_pylist() if r["condition"].startswith("top1:"))
    assert cond["heads"] == HEAD
    rows = home.sql("SELECT prompt_idx, sample, prompt, text FROM generations WHERE version = ? AND condition = ? "
                    "ORDER BY prompt_idx, sample", [results["intervene"]["version"], cond["condition"]]).to_pylist()
    prompts = {r["prompt_idx"]: r["prompt"] for r in rows}
    lm = loralens.load_model(config["model"]["name"], home=path)
    texts = []
    with loralens.ablate(lm.model, cond["heads"], kind="zero"):
        for r in prompt_batches(len(prompts), ic.batch_prompts):
            out = generate_joint(lm.model, lm.tokenizer, [prompts[i] for i in r], k=ic.k,
                                 max_new_tokens=ic.max_new_tokens, top_p=ic.top_p, seed=ic.seed)
            texts += [t for row in out for t in row]
    assert texts == [r["text"] for r in rows]

    ids = lm.tokenizer(rows[0]["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = lm.model(ids).logits
        with loralens.ablate(lm.model, []):
            untouched = lm.model(ids).logits
        with loralens.ablate(lm.model, [PLANTED]):
            ablated = lm.model(ids).logits
    assert torch.equal(plain, untouched) and not torch.allclose(plain, ablated)
    with pytest.raises(loralens.ApiError, match=r"^heads: L1H9: head 9 is out of range: layers have 4 heads \(0-3\)$"):
        with loralens.ablate(lm.model, "L1H9"):
            pass
    with pytest.raises(loralens.ApiError, match=r"^heads: L3H0: layer 3 is not in the model \(layers: 0-2\)$"):
        with loralens.ablate(lm.model, ["L0H0", (3, 0)]):
            pass


def test_inspect_prints_the_planted_heads_toxic_token(planted_home, capsys):
    _config, results, path = planted_home
    home = loralens.open(path)
    prompt = home.sql("SELECT text FROM prompts WHERE toxicity > 0.5 ORDER BY prompt_idx LIMIT 1")["text"][0].as_py()
    assert main(["inspect", HEAD, "--prompt", prompt, "--home", str(path), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_version"] == results["train"]["version"]
    trained = next(r for r in out["rows"] if r["head"] == HEAD and r["lens"] == "trained")
    assert trained["top"][0]["token"] == TOXIC_WORD and trained["expected_toxicity"] is not None
    assert len(trained["top"]) == 10 and {r["lens"] for r in out["rows"]} == {"trained", "logit"}
    assert main(["inspect", HEAD, "L0H0", "--prompt", prompt, "--home", str(path), "--k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:4] == ["head", "pos", "token", "lens"]
    first = table[3]
    assert first.startswith(HEAD) and "trained" in first and f'"{TOXIC_WORD}"' in first
    # Each probability is printed with its multiple of uniform (x p V), which the header explains.
    vocab = home.lenses().lean.dims.vocab
    p = trained["top"][0]["prob"]
    assert f'"{TOXIC_WORD}" {p:.2g} (x{p * vocab:.3g})' in first
    assert f"uniform {1 / vocab:.2g}" in table[0] and "(x its uniform 1/V)" in table[1]


def test_effect_rows_name_the_planted_heads_toxic_token(planted_home, capsys):
    """The planted head writes its toxic token's unembedding direction: what it adds to the model's own output is
    that token first, with positive probability and toxicity; the lens rows are those of a decode without the
    effect."""
    _config, _results, path = planted_home
    home = loralens.open(path)
    prompt = home.sql("SELECT text FROM prompts WHERE toxicity > 0.5 ORDER BY prompt_idx LIMIT 1")["text"][0].as_py()
    lenses = home.lenses()
    plain = lenses.decode(prompt, heads=[HEAD, "L0H0"], k=3, position="last")
    both = lenses.decode(prompt, heads=[HEAD, "L0H0"], k=3, position="last", effect=True)
    assert both.table.filter(pc.not_equal(both.table["lens"], "effect")).equals(plain.table)
    rows = [r for r in both.table.to_pylist() if r["lens"] == "effect"]
    assert len(rows) == 2 * 3 and [r["rank"] for r in rows] == [1, 2, 3] * 2
    planted = [r for r in rows if f"L{r['layer']}H{r['head']}" == HEAD]
    assert planted[0]["token"] == TOXIC_WORD and planted[0]["prob"] > 0 and planted[0]["logit"] > 0
    assert [r["prob"] for r in planted] == sorted((r["prob"] for r in planted), reverse=True)
    other = next(r for r in rows if (r["layer"], r["head"]) == (0, 0))
    assert planted[0]["expected_toxicity"] > max(other["expected_toxicity"], 0.0)
    assert both.top(HEAD, lens="effect")[0] == (TOXIC_WORD, planted[0]["prob"])
    with pytest.raises(loralens.ApiError, match=r"^effect: must be True or False, got 1$"):
        lenses.decode(prompt, heads=HEAD, effect=1)
    assert main(["inspect", HEAD, "--prompt", prompt, "--position", "last", "--k", "2", "--effect", "--home",
                 str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("effect: what the head adds to the model's own next-token distribution")
    assert "effect: probability it adds to the model's output" in out[2]
    lines = [line for line in out[4:] if line.startswith(HEAD)]
    assert [line.split()[3] for line in lines] == ["trained", "logit", "effect"]
    assert f'"{TOXIC_WORD}" +{planted[0]["prob"] * 100:.2g}%' in lines[2] and lines[2].split()[4].startswith("+")


@pytest.mark.parametrize(
    ("heads", "message"),
    [(["L1H4"], "heads: L1H4: head 4 is out of range: layers have 4 heads (0-3)"),
     (["L3H0"], "heads: L3H0: layer 3 has no trained lens (layers: 0-2)"),
     (["X1"], "heads: bad head 'X1'; expected LAYER.HEAD (e.g. 3.1) or LxHy (e.g. L3H1)")],
)
def test_inspect_head_out_of_range_is_one_line(planted_home, capsys, heads, message):
    _config, _results, path = planted_home
    assert main(["inspect", *heads, "--prompt", "the cat", "--home", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"loralens: error: {message}\n" and captured.out == ""


def test_inspect_without_a_trained_version_is_one_line(tmp_path, capsys):
    from loralens.warehouse.db import connect, warehouse_path

    assert main(["inspect", "L0H0", "--prompt", "hi", "--home", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"loralens: error: no warehouse at {warehouse_path(tmp_path)}; run the "
                                       "pipeline first (`loralens run`)\n")
    with connect(warehouse_path(tmp_path)):  # an empty warehouse: nothing trained yet
        pass
    assert main(["inspect", "L0H0", "--prompt", "hi", "--home", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"loralens: error: no complete train version in {tmp_path}; run `loralens "
                                       "run` (at least `--only cache` and `--only train`) first\n")


def test_mechanisms_reads_every_head_through_both_lenses(planted_home):
    """One row per head of every layer, rates in [0, 1], trained columns exactly on the trained layers; the same
    seed gives the same table."""
    from loralens.lens.evaluation.mechanisms import COLUMNS

    _config, results, path = planted_home
    lenses = loralens.open(path).lenses()
    mech = lenses.mechanisms(batch=3, seq_len=6, seed=1)
    n_layers, n_heads = lenses.lean.dims.n_layers, lenses.n_heads
    rows = mech.rows()
    assert mech.table.column_names == ["layer", "head", *COLUMNS]
    assert [(r["layer"], r["head"]) for r in rows] == [(la, h) for la in range(n_layers) for h in range(n_heads)]
    assert lenses.layers  # the planted run trains every layer: each row has both lenses
    for r in rows:
        trained = r["layer"] in lenses.layers
        assert all((r[c] is None) == ("trained" in c and not trained or "effect" in c) for c in COLUMNS)
        assert all(0.0 <= r[c] <= 1.0 for c in COLUMNS if r[c] is not None)
        assert r["copy_top5_logit"] >= r["copy_top1_logit"]
    assert mech.train_version == results["train"]["version"] and mech.n_positions == 3 * (6 - 1)
    assert 0.0 <= mech.model_top1 <= 1.0 and (mech.batch, mech.seq_len, mech.seed) == (3, 6, 1)
    assert mech.summary(0.0)["n_induction_heads"] == n_layers * n_heads
    assert mech.summary_line().split(";")[0].endswith("(score >= 0.3)")
    assert lenses.mechanisms(batch=3, seq_len=6, seed=1).table.equals(mech.table)
    with pytest.raises(loralens.ApiError, match=r"^seq_len: must be an integer >= 2, got 1$"):
        lenses.mechanisms(seq_len=1)
    with pytest.raises(loralens.ApiError, match=r"^effect: must be True or False, got 'yes'$"):
        lenses.mechanisms(effect="yes")
    effect = lenses.mechanisms(batch=3, seq_len=6, seed=1, effect=True)
    assert effect.table.drop_columns(["copy_top1_effect", "copy_top5_effect"]).equals(
        mech.table.drop_columns(["copy_top1_effect", "copy_top5_effect"]))  # the effect adds its columns only
    for r in effect.rows():
        assert 0.0 <= r["copy_top1_effect"] <= r["copy_top5_effect"] <= 1.0
    assert effect.summary()["n_with_effect"] == effect.summary()["n_induction_heads"]


def test_inspect_mechanisms_prints_the_tables_and_the_summary(planted_home, capsys):
    _config, results, path = planted_home
    assert main(["inspect", "--mechanisms", "--top", "3", "--home", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"train version {results['train']['version']}; 8 sequences of 25 random tokens")
    assert "model's own top-1 on the repeat: " in out[0]
    for title in ("top 3 heads by induction score:", "top 3 heads by copy top-1 through the trained lens:"):
        i = out.index(title)
        assert out[i + 1].split("  ")[0] == "head" and "copy top-1 logit lens" in out[i + 1]
        assert "copy top-5 trained lens" in out[i + 1] and out[i + 2].startswith("----")
        assert all(line.startswith("L") for line in out[i + 3:i + 6]) and out[i + 6] == ""
    induction = [float(line.split()[1]) for line in out[out.index("top 3 heads by induction score:") + 3:][:3]]
    assert induction == sorted(induction, reverse=True)
    assert re.fullmatch(r"\d+ induction heads? \(score >= 0\.3\); .*best copier.*", out[-1])
    assert main(["inspect", "--mechanisms", "--home", str(path), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["train_version"] == results["train"]["version"] and data["summary"]["threshold"] == 0.3
    assert len(data["rows"]) == 3 * 4 and data["n_positions"] == 8 * 24
    assert main(["inspect", "--mechanisms", "--effect", "--top", "2", "--home", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("top 2 heads by copy top-1 through the effect:")
    assert "copy top-1 effect" in out[i + 1] and out[i + 2].startswith("----")
    effects = [float(line.split()[-2]) for line in out[i + 3:i + 5]]
    assert effects == sorted(effects, reverse=True) and re.search(r"best copier.*effect \d\.\d{3}", out[-1])


def test_quickstart_runs_on_the_home(planted_home, capsys, monkeypatch):
    """The example, run as a script with --home (its default is the embedded model's default run)."""
    _config, _results, path = planted_home
    monkeypatch.setattr(sys, "argv", [str(QUICKSTART), "--home", str(path), "--new-tokens", "4"])
    runpy.run_path(str(QUICKSTART), run_name="__main__")
    out = capsys.readouterr().out
    assert f"1. {HEAD}" in out
    trained = next(line for line in out.splitlines() if "trained lens:" in line)
    assert trained.split("trained lens: ")[1].startswith(json.dumps(TOXIC_WORD))
    assert "as is:" in out and f"without {HEAD}:" in out
    assert "and loaded back: same top tokens: True" in out


def test_stage_chain_names_the_versions_the_run_made(planted_home):
    from loralens.config import parse_config
    from loralens.tasks.chain import stage_chain

    config, results, _path = planted_home
    cfg = parse_config(config)
    chain = stage_chain(cfg)
    assert {stage: ver.version for stage, ver in chain.items()} == {
        stage: results[stage]["version"] for stage in ("cache", "train", "decode", "attribute")}
    assert list(stage_chain(cfg, "train", chain["cache"])) == ["cache", "train"]
    # Through intervene once its inputs are complete: the version names the head sets the run resolved.
    assert stage_chain(cfg, "intervene")["intervene"].version == results["intervene"]["version"]
    with pytest.raises(ValueError, match="through: expected one of"):
        stage_chain(cfg, "nope")
