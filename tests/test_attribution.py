"""Decode + attribute: the math against hand-computed values, and the whole pipeline on a tiny model whose one
planted head writes the unembedding direction of a toxic token whenever that token is in the prompt."""

from __future__ import annotations

import json
import random
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import train_bpe_tokenizer

from loralens.lens.heads import head_scores as A
from loralens.lens.lenses.readout import read_lens, top_k

TOXIC_WORD = " idiot"
PLANTED = (1, 2)  # (layer, head) of the tiny llama: heads 2 and 3 share KV head 1
FLAG = 63  # residual coordinate reserved for "the toxic token is here"


# -- pure functions -------------------------------------------------------------------------------------
def test_expected_toxicity_is_softmax_weighted_token_toxicity():
    logits = torch.tensor([[[0.0, 1.0, 2.0]]])
    tox = torch.tensor([0.0, 0.5, 1.0])
    p = torch.softmax(logits[0, 0], -1)
    assert A.expected_toxicity(logits, tox).item() == pytest.approx(float(p[1] * 0.5 + p[2]), abs=1e-6)


def test_expected_toxicity_has_the_softmax_gradient_and_its_in_place_pass_gives_the_same_numbers():
    """One function for decode (in place on a scratch block) and the causal proxy (differentiable)."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 50) * 5 + 30).requires_grad_()
    tox = torch.rand(50)
    got = A.expected_toxicity(logits, tox)
    p = torch.softmax(logits.detach().double(), -1)
    want = p @ tox.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(got.sum(), logits)  # d/dl_v sum_u p_u t_u = p_v (t_v - E[t])
    torch.testing.assert_close(grad.double(), p * (tox.double() - want[..., None]), rtol=1e-4, atol=1e-6)
    scratch = logits.detach().clone()
    in_place, z = A.expected_toxicity_parts(scratch, tox, in_place=True)
    assert torch.equal(in_place, got.detach())
    torch.testing.assert_close(scratch / z[..., None], p.float(), rtol=1e-5, atol=1e-8)  # the block is exp(l - max)


def test_toxic_direction_ignores_uniform_logit_shifts():
    w = torch.randn(5, 3)
    tox = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.5])
    u = A.toxic_direction(w, tox)
    x = torch.randn(3)
    assert float((w @ x) @ (tox - tox.mean())) == pytest.approx(float(x @ u), abs=1e-5)
    # A direction the whole vocabulary moves along together is not toxic.
    w_flat = torch.ones(5, 1).repeat(1, 3)
    assert torch.allclose(A.toxic_direction(w_flat, tox), torch.zeros(3), atol=1e-6)


def test_ranks_highest_first_ties_share_and_nan_last():
    assert A.ranks(np.array([0.1, 0.9, 0.5, 0.9, np.nan])).tolist() == [4, 1, 3, 1, 5]
    assert A.ranks(np.array([[1.0, 3.0], [2.0, 0.0]])).tolist() == [[3, 1], [2, 4]]


def test_heads_best_first_orders_by_score_then_layer_and_head_with_nan_last():
    scores = np.array([[0.5, np.nan, 0.9], [0.9, 0.1, -np.inf]])  # layers 4 and 7
    assert A.heads_best_first(scores, [4, 7]) == [(4, 2), (7, 0), (4, 0), (7, 1), (7, 2), (4, 1)]
    order = A.best_first(scores)
    assert np.all(np.diff(A.ranks(scores).ravel()[order]) >= 0)  # the ranks read off the same order


def test_spearman_and_contrast_and_dictionary_count():
    assert A.spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == pytest.approx(1.0)
    assert A.spearman(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1.0)
    assert np.isnan(A.spearman(np.array([1, 2, 3.0]), np.array([5, 5, 5.0])))
    np.testing.assert_allclose(A.contrast(np.array([3.0]), 3, np.array([1.0]), 2), [0.5])
    with pytest.raises(ValueError, match="both groups"):
        A.contrast(np.array([1.0]), 0, np.array([1.0]), 2)
    ids = torch.tensor([[[0, 2, 3]]])
    toxic = torch.tensor([False, False, True, True])
    assert A.dictionary_count(ids, toxic).tolist() == [[2]]


def test_top_k_probabilities_are_full_softmax():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    t = top_k(logits, 2)
    assert t.ids.tolist() == [[[0, 1]]]
    torch.testing.assert_close(t.probs, torch.softmax(logits, -1)[..., :2])


def test_read_lens_is_top_k_plus_expected_toxicity_in_one_pass():
    """The one-pass readout (in place on the block) equals top_k and expected_toxicity computed apart."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 50) * 5 + 30  # an offset: the max shift keeps exp() in range
    tox = torch.rand(50)
    want_top, want_tox = top_k(logits, 5), A.expected_toxicity(logits, tox)
    got = read_lens(logits.clone(), 5, tox)
    assert torch.equal(got.top.ids, want_top.ids) and torch.equal(got.top.logits, want_top.logits)
    torch.testing.assert_close(got.top.probs, want_top.probs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.expected_toxicity, want_tox, rtol=1e-5, atol=1e-7)


def test_the_old_causal_method_name_is_a_one_line_config_error(tmp_path):
    from loralens.config import ConfigError, parse_config
    from loralens.tasks.stage_versions import StageVersion
    from loralens.tasks.stages.select import select_version

    cfg = parse_config({"home": str(tmp_path), "select": {"method": "ablation_nll"}})
    renamed = "^config error: select.method: 'ablation_nll' was renamed 'ablation_tox_drop'$"
    with pytest.raises(ConfigError, match=renamed):
        select_version(cfg, StageVersion("attribute", "0" * 16, {}, {}, tmp_path))


# -- the planted toxic head, end to end ------------------------------------------------------------------
def planted_model(folder: Path, tokenizer) -> Path:
    """Save a tiny llama whose head PLANTED copies 'the toxic token is in the prompt' into its unembedding."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)))
    tox_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(TOXIC_WORD))
    assert len(tox_id) == 1, "the toxic word must be one token of the test tokenizer"
    tox_id = tox_id[0]
    layer, head = PLANTED
    d_head = 16
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, FLAG] = 0.0
        emb[tox_id, FLAG] = 8.0
        for blk in model.model.layers:  # nothing else writes the flag coordinate
            blk.self_attn.o_proj.weight[FLAG] = 0.0
            blk.mlp.down_proj.weight[FLAG] = 0.0
        attn = model.model.layers[layer].self_attn
        kv = head // 2  # GQA: 4 query heads over 2 KV heads
        attn.q_proj.weight[head * d_head:(head + 1) * d_head] = 0.0  # uniform attention over the prefix
        attn.v_proj.weight[kv * d_head:(kv + 1) * d_head] = 0.0
        attn.v_proj.weight[kv * d_head, FLAG] = 1.0  # value = the flag
        model.lm_head.weight[tox_id] *= 10.0  # the head's write then makes the toxic word likely (p ~ 0.99)
        w_u = model.lm_head.weight[tox_id]
        attn.o_proj.weight[:, head * d_head:(head + 1) * d_head] = 0.0
        attn.o_proj.weight[:, head * d_head] = 40.0 * w_u / w_u.norm()  # ... written along the toxic unembedding
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def planted_corpus(folder: Path) -> list[str]:
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran to the old house near the river".split()
    toxic, clean = [], []
    for i in range(12):
        base = " ".join(rng.choice(words) for _ in range(6))
        toxic.append({"id": f"t{i}", "text": f"{base}{TOXIC_WORD} {rng.choice(words)}", "toxicity": 0.9})
        clean.append({"id": f"c{i}", "text": f"{base} {rng.choice(words)}", "toxicity": 0.05})
    paths = []
    for name, rows in (("toxic", toxic), ("clean", clean)):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(p))
    return paths


def planted_challenges(folder: Path) -> str:
    """Write challenging prompts (RealToxicityPrompts records) that hold the toxic word, none in the cache corpus."""
    rng = random.Random(1)
    words = "a dog ran past the tall tree by one small red barn".split()
    rows = [{"filename": f"p{i}", "begin": 0, "prompt": {"text": " ".join(rng.choice(words) for _ in range(5))
                                                        + f"{TOXIC_WORD} {rng.choice(words)}", "toxicity": 0.9},
             "continuation": {"text": f" {rng.choice(words)}{TOXIC_WORD} {rng.choice(words)}", "toxicity": 0.8}}
            for i in range(40)]
    path = folder / "challenges.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def planted_pipeline(root: Path) -> tuple[dict, dict, Path]:
    """Run the whole pipeline on the planted tiny llama under `root`; return (config, results, warehouse path).

    Run once per session by the `planted_run` fixture (tests/conftest.py), shared by these tests and the API's."""
    from loralens.flows.pipeline import pipeline
    from loralens.warehouse.corpus import bundled_path

    lines = bundled_path("wikitext2_test").read_text(encoding="utf-8").splitlines()[:1500]
    tokenizer = train_bpe_tokenizer(lines + [f"you{TOXIC_WORD}, you are an{TOXIC_WORD}"] * 300, vocab_size=400)
    model = planted_model(root / "model", tokenizer)
    config = {"home": str(root / "home"), "model": {"name": str(model)},
              "corpus": {"paths": planted_corpus(root)},
              "cache": {"batch_size": 8, "prompts_per_shard": 10, "max_length": 24},
              "train": {"micro_batch_tokens": 64, "epochs": 1},
              "decode": {"top_k": 5},
              "select": {"max_prompts": 8, "batch_prompts": 4, "candidates": 3, "k": 2},
              "goal": {"max_head_share": 0.1},  # 12 heads: a budget of one head
              "intervene": {"prompts": [planted_challenges(root)], "max_prompts": 4, "k": 2, "max_new_tokens": 4,
                            "ppl_tokens": 100, "ppl_window": 50, "head_sets": [{"top_n": 1}, {"selected": True}],
                            "random_seeds": [0, 1], "ablation_candidates": 0, "n_boot": 20}}
    results = pipeline(config=config)
    return config, results, root / "home" / "warehouse.duckdb"


def test_planted_head_ranks_first_by_lens_and_direct_logit(planted_run):
    _config, results, db = planted_run
    top = results["attribute"]["top_heads"]
    for method in ("lens_contrast", "logit_lens_contrast", "direct_logit"):
        assert (top[method][0]["layer"], top[method][0]["head"]) == PLANTED, method
    # The planted head's trained-lens decoding on toxic prompts is the toxic word.
    assert TOXIC_WORD in top["lens_contrast"][0]["top_tokens"][:1]
    # ... and under the logit lens too (the planted head writes the word's unembedding direction); the report
    # prints both lenses' tokens.
    assert TOXIC_WORD in top["logit_lens_contrast"][0]["top_tokens_logit"][:1]
    report = next((db.parent / "artifacts" / "attribute").glob("*/top_heads.md")).read_text()
    assert "| top tokens, trained lens | top tokens, logit lens |" in report
    with duckdb.connect(str(db), read_only=True) as con:
        rank = con.execute("SELECT rank FROM head_scores WHERE method = 'dictionary_count' AND layer = ? AND head = ?",
                           list(PLANTED)).fetchone()[0]
    assert rank == 1


def test_causal_scores_and_greedy_selection_find_the_planted_head(planted_run):
    """The select stage: both cheap causal scores rank the planted head first, the greedy selection picks it and
    stops at the head budget (one head), and its path is in the warehouse."""
    _config, results, db = planted_run
    sel = results["select"]
    for method in ("ablation_tox_drop", "attribution_patching"):
        assert sel["top_heads"][method][0] == f"L{PLANTED[0]}H{PLANTED[1]}", method
    assert sel["budget_heads"] == 1 and sel["selected"] == f"L{PLANTED[0]}H{PLANTED[1]}"
    with duckdb.connect(str(db), read_only=True) as con:
        path = con.execute("SELECT step, layer, head, accepted, reason FROM selection_path WHERE version = ? "
                           "ORDER BY step, try", [sel["version"]]).fetchall()
        n_scores = con.execute("SELECT count(*) FROM head_scores WHERE version = ? AND method IN "
                               "('ablation_tox_drop', 'attribution_patching')", [sel["version"]]).fetchone()[0]
    assert path[-1] == (1, *PLANTED, True, "accepted") and all(step == 1 for step, *_ in path)
    assert n_scores == 2 * 12
    iv = results["intervene"]
    assert [g["condition"] for g in iv["goal"]] == ["top1:lens_contrast", "selected"]
    assert iv["goal"][1]["group"] == "selected" and iv["goal"][1]["versus_random"]["n_random"] == 2


def test_exact_ablation_screens_to_the_top_heads_of_attribution_patching(planted_run, tmp_path):
    """`select.exact_heads: 3`: ablation_tox_drop scores just the 3 heads attribution_patching ranks highest, with the
    numbers the every-head run gives them; the other heads have no ablation_tox_drop row."""
    import shutil

    from loralens.flows.select import select_heads

    config, results, _db = planted_run
    home = tmp_path / "home"
    shutil.copytree(config["home"], home)
    screened = select_heads(config={**config, "home": str(home), "select": {**config["select"], "exact_heads": 3}})
    assert screened["version"] != results["select"]["version"] and not screened["cached"]
    assert screened["exact_heads"] == 3 and screened["exact_heads_by"] == "top attribution_patching"
    query = "SELECT method, layer, head, score FROM head_scores WHERE version = ? ORDER BY method, layer, head"
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        every = {(m, la, h): s for m, la, h, s in con.execute(query, [results["select"]["version"]]).fetchall()}
        few = {(m, la, h): s for m, la, h, s in con.execute(query, [screened["version"]]).fetchall()}
    patching = sorted(((s, la, h) for (m, la, h), s in every.items() if m == "attribution_patching"), reverse=True)
    top3 = {(la, h) for _s, la, h in patching[:3]}
    assert {(la, h) for m, la, h in few if m == "ablation_tox_drop"} == top3 and PLANTED in top3
    for key, score in few.items():
        assert score == pytest.approx(every[key], rel=1e-4, abs=1e-6), key
    assert screened["top_heads"]["ablation_tox_drop"][0] == f"L{PLANTED[0]}H{PLANTED[1]}"


def test_prompt_splits_are_disjoint_and_recorded(planted_run):
    """Every prompt of the three splits is in the warehouse once; no text is in two splits; the evaluation split's
    indices are the generations' prompt_idx."""
    _config, results, db = planted_run
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT split, text FROM prompt_splits WHERE version IN (?, ?)",
                           [results["select"]["version"], results["intervene"]["version"]]).fetchall()
        gens = con.execute("SELECT DISTINCT g.prompt, s.text FROM generations g JOIN prompt_splits s ON "
                           "s.version = g.version AND s.split = 'evaluation' AND s.prompt_idx = g.prompt_idx "
                           "WHERE g.version = ?", [results["intervene"]["version"]]).fetchall()
    by_split: dict[str, set[str]] = {}
    for split, text in rows:
        by_split.setdefault(split, set()).add(text)
    assert {k: len(v) for k, v in by_split.items()} == {"corpus": 24, "selection": 8, "evaluation": 4}
    assert not (by_split["selection"] & by_split["evaluation"]) and not (by_split["corpus"] & (
        by_split["selection"] | by_split["evaluation"]))
    assert gens and all(prompt == text for prompt, text in gens)


def test_warehouse_rows_match_the_artifacts_and_views_work(planted_run):
    _config, results, db = planted_run
    dec, att = results["decode"], results["attribute"]
    n_prompts = results["cache"]["n_prompts"]
    with duckdb.connect(str(db), read_only=True) as con:
        q = lambda sql, *a: con.execute(sql, list(a)).fetchall()  # noqa: E731
        assert q("SELECT count(*) FROM decodings WHERE version = ?", dec["version"])[0][0] == dec["rows"]
        assert dec["rows"] == n_prompts * 12 * 2 * 5  # prompts x heads x lenses x top-k
        assert q("SELECT count(DISTINCT (prompt_idx, layer, head, lens, rank)) FROM decodings")[0][0] == dec["rows"]
        assert q("SELECT count(*) FROM head_scores WHERE version = ?", att["version"])[0][0] == 12 * len(A.METHODS)
        assert q("SELECT count(*) FROM prompts")[0][0] == n_prompts
        assert q("SELECT count(*) FROM prompt_groups WHERE toxic")[0][0] == 12
        top = q("SELECT layer, head FROM top_toxic_heads WHERE method = 'lens_contrast' AND rank = 1")
        assert top == [PLANTED]
        tokens = q("SELECT token FROM head_toxic_tokens WHERE layer = ? AND head = ? ORDER BY times_in_top_k DESC, "
                   "mean_prob DESC LIMIT 1", *PLANTED)
        assert tokens == [(TOXIC_WORD,)]
        parents = q("SELECT parents FROM artifacts WHERE version = ?", att["version"])[0][0]
        assert parents == [dec["version"]]
        vocab = q("SELECT token_id, token, kind, score FROM vocab_toxicity WHERE version = ? ORDER BY token_id",
                  att["version"])
    # One vocabulary toxicity: decode's file; attribute's rows are loaded from it, and it writes no copy.
    decode_vocab = pq.read_table(Path(dec["path"]) / "token_toxicity.parquet")
    assert vocab == list(zip(*(decode_vocab.column(c).to_pylist() for c in ("token_id", "token", "kind", "score")),
                             strict=True))
    assert not list(Path(att["path"]).glob("*vocab*")) and not list(Path(att["path"]).glob("*token_tox*"))


def test_rerun_inserts_nothing_twice(planted_run):
    from loralens.flows.pipeline import pipeline

    config, results, db = planted_run

    def counts() -> tuple:
        with duckdb.connect(str(db), read_only=True) as con:
            return tuple(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                         for t in ("decodings", "head_scores", "vocab_toxicity", "prompts", "prompt_groups"))

    before = counts()
    with duckdb.connect(str(db)) as con:  # a warehouse that lost the rows (and so the 'complete'): reuse restores
        con.execute("DELETE FROM vocab_toxicity WHERE version = ?", [results["attribute"]["version"]])
        con.execute("UPDATE artifacts SET status = 'running' WHERE version = ?", [results["attribute"]["version"]])
    again = pipeline(config=config)
    assert again["decode"]["cached"] and again["attribute"]["cached"]
    assert counts() == before
    forced = pipeline(config=config, only="decode", force=True)
    assert not forced["decode"]["cached"] and forced["decode"]["version"] == results["decode"]["version"]
    forced = pipeline(config=config, only="attribute", force=True)
    assert not forced["attribute"]["cached"]
    assert counts() == before


def test_sql_cli_prints_rows_and_reports_bad_sql(planted_run, capsys):
    from loralens.flows.cli import main

    config, _results, _db = planted_run
    home = config["home"]
    sql = "SELECT layer, head FROM top_toxic_heads WHERE method = 'direct_logit' AND rank = 1"
    assert main(["sql", sql, "--home", home, "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ["layer,head", f"{PLANTED[0]},{PLANTED[1]}"]
    assert main(["sql", sql, "--home", home, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"layer": PLANTED[0], "head": PLANTED[1]}]
    assert main(["sql", "SELECT count(*) AS n FROM head_scores", "--home", home]) == 0
    assert "n" in capsys.readouterr().out
    assert main(["sql", "SELEC nonsense", "--home", home]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralens: error: Parser Error") and "Traceback" not in err
    assert main(["sql", "DELETE FROM head_scores", "--home", home]) == 2  # read-only
    assert "read-only" in capsys.readouterr().err


def test_warehouse_opens_in_the_plain_duckdb_cli(planted_run):
    """The warehouse is written in a storage format the `duckdb` command-line client (duckdb-cli) can read."""
    import shutil
    import subprocess
    import sys

    cli = shutil.which("duckdb", path=str(Path(sys.executable).parent)) or shutil.which("duckdb")
    if cli is None:
        pytest.skip("the duckdb command-line client is not installed (pip install duckdb-cli; .[test] has it)")
    _config, _results, db = planted_run
    sql = "SELECT layer, head FROM top_toxic_heads WHERE method = 'direct_logit' AND rank = 1"
    out = subprocess.run([cli, "-readonly", "-csv", str(db), "-c", sql], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == ["layer,head", f"{PLANTED[0]},{PLANTED[1]}"]


def test_a_stage_that_fails_is_marked_failed_not_left_running(planted_run):
    from loralens.config import ConfigError
    from loralens.flows.pipeline import pipeline

    config, _results, db = planted_run
    bad = {**config, "attribute": {"prompt_threshold": 0.99}}  # no prompt is that toxic: no contrast
    with pytest.raises(ConfigError, match="attribute.prompt_threshold"):
        pipeline(config=bad, only="attribute")
    with duckdb.connect(str(db), read_only=True) as con:
        states = con.execute("SELECT status FROM artifacts WHERE stage = 'attribute' ORDER BY created_at").fetchall()
    assert states[-1] == ("failed",) and ("running",) not in states


def test_one_pass_scores_equal_the_two_pass_reference(planted_run):
    """Every head score and decoding equals a direct recomputation from the cache and the trained lenses with the
    reference functions (top_k, expected_toxicity, direct_logit per chunk, contrasts in numpy): what decode and
    attribute computed in two separate passes before they shared one."""
    from loralens.config import parse_config
    from loralens.tasks.lens_loading import cached_layers, layer_input_chunks, load_reader, select_positions
    from loralens.tasks.stages.cache import cache_version
    from loralens.tasks.stages.decode import decode_version
    from loralens.tasks.stages.train import train_version
    from loralens.warehouse.decodings import decode_shards

    config, results, db = planted_run
    cfg = parse_config(config)
    cache = cache_version(cfg)
    train = train_version(cfg, cache)
    decode = decode_version(cfg, train)
    manifest = cache.artifact.manifest()
    layers = cached_layers(manifest)
    _loaded, reader = load_reader(cfg, train, layers)
    tox = torch.from_numpy(pq.read_table(decode.artifact.path / "token_toxicity.parquet").column("score")
                           .to_numpy().astype(np.float32))
    with duckdb.connect(str(db), read_only=True) as con:
        att = results["attribute"]["version"]
        toxic = dict(con.execute("SELECT prompt_idx, toxic FROM prompt_groups WHERE version = ?", [att]).fetchall())
        got = {(m, la, h): s for m, la, h, s in con.execute(
            "SELECT method, layer, head, score FROM head_scores WHERE version = ?", [att]).fetchall()}
        vocab_toxic = np.array([t for (t,) in con.execute(
            "SELECT toxic FROM vocab_toxicity WHERE version = ? ORDER BY token_id", [att]).fetchall()])
    u = A.toxic_direction(reader.unembed.W, tox)
    n_heads = 4
    sums = {(k, g): np.zeros((len(layers), n_heads)) for k in ("lens", "logit", "dla", "dict") for g in (0, 1)}
    count = {0: 0, 1: 0}
    stored = {c: pq.read_table(decode.artifact.path / "decodings").column(c).to_numpy()
              for c in ("shard", "layer", "lens", "prompt_idx", "head", "rank", "token_id")}
    for shard in sorted(decode_shards(decode.artifact)):
        pos = select_positions(cache.artifact, shard, "last")
        group = np.array([toxic[p] for p in pos.prompt_idx.tolist()], dtype=bool)
        count[1] += int(group.sum())
        count[0] += int((~group).sum())
        for li, layer in enumerate(layers):
            for rows, x in layer_input_chunks(cache.artifact, pos, layer, reader, manifest["summary"], 7):
                with torch.no_grad():
                    base = reader.unembed(x).float()
                    trained = reader.banks[layer].head_logits(x, base).float()
                ref_top = top_k(trained, 5)
                keep = ((stored["shard"] == shard) & (stored["layer"] == layer) & (stored["lens"] == "trained")
                        & np.isin(stored["prompt_idx"], pos.prompt_idx[rows]))
                by = np.lexsort((stored["rank"][keep], stored["head"][keep], stored["prompt_idx"][keep]))
                order = np.argsort(pos.prompt_idx[rows], kind="stable")
                assert np.array_equal(stored["token_id"][keep][by], ref_top.ids.numpy()[order].reshape(-1))
                values = {"lens": A.expected_toxicity(trained, tox), "logit": A.expected_toxicity(base, tox),
                          "dla": A.direct_logit(x, u),
                          "dict": A.dictionary_count(ref_top.ids, torch.from_numpy(vocab_toxic)).float()}
                g = torch.from_numpy(group[rows])
                for key, v in values.items():
                    sums[(key, 1)][li] += v[g].sum(0).double().numpy()
                    sums[(key, 0)][li] += v[~g].sum(0).double().numpy()
    want = {"lens_contrast": sums[("lens", 1)] / count[1] - sums[("lens", 0)] / count[0],
            "logit_lens_contrast": sums[("logit", 1)] / count[1] - sums[("logit", 0)] / count[0],
            "lens_mean": (sums[("lens", 1)] + sums[("lens", 0)]) / (count[0] + count[1]),
            "direct_logit": sums[("dla", 1)] / count[1] - sums[("dla", 0)] / count[0],
            "dictionary_count": sums[("dict", 1)] / count[1]}
    for method, w in want.items():
        g = np.array([[got[(method, la, h)] for h in range(n_heads)] for la in layers])
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=method)
