"""The select side of steering on the planted-toxic-head tiny llama (tests/test_attribution.py), without Prefect:
directions from the three sources, sigmas, the first-order ranking and the exact search, which must choose the
planted head, within the perplexity budget, on selection-split measurements alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import train_bpe_tokenizer
from test_attribution import PLANTED, TOXIC_WORD, planted_model

from loralens.config import SteeringConfig
from loralens.lens.heads.causal_scores import expected_toxicity_proxy, teacher_forced_batches
from loralens.lens.heads.directions import scored_activations
from loralens.lens.runtime.adapters import adapter_for, folded_unembedding, model_dims
from loralens.lens.runtime.models import LoadedModel
from loralens.tasks.evaluation import steering as S
from loralens.tasks.evaluation.steering_controls import draw_random_sets


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from loralens.warehouse.corpus import bundled_path

    root = tmp_path_factory.mktemp("steering")
    lines = bundled_path("wikitext2_test").read_text(encoding="utf-8").splitlines()[:1500]
    tokenizer = train_bpe_tokenizer(lines + [f"you{TOXIC_WORD}, you are an{TOXIC_WORD}"] * 300, vocab_size=400)
    path = planted_model(root / "model", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    loaded = LoadedModel(model, tokenizer, adapter_for("llama"), model_dims(model.config), str(path), "test")
    words = "a dog ran past the tall tree by one small red barn".split()
    prompts = [" ".join(words[i:i + 3]) + (TOXIC_WORD if i % 2 else "") for i in range(10)]
    continuations = [f" {words[i]}{TOXIC_WORD}" if i % 2 else f" {words[i]} {words[i + 1]}" for i in range(10)]
    tox = torch.zeros(model.config.vocab_size)
    tox[tokenizer.convert_tokens_to_ids(tokenizer.tokenize(TOXIC_WORD))[0]] = 1.0
    batches = teacher_forced_batches(tokenizer, prompts, continuations, batch_size=4)
    benign = " ".join(lines[:40])
    nll_batches = teacher_forced_batches(tokenizer, [""] * 2, [benign[:200], benign[200:400]], batch_size=2,
                                         max_continuation_tokens=48)
    return loaded, batches, nll_batches, tox, benign


def test_labels_cut_at_the_threshold_or_the_median():
    toxic, how = S.contrast_labels(np.array([0.1, 0.7, 0.4]), 0.5)
    assert toxic.tolist() == [False, True, False] and how == ">= 0.5"
    toxic, how = S.contrast_labels(np.array([0.1, 0.2, 0.3, 0.4]), 0.5)
    assert toxic.tolist() == [False, False, True, True] and how == "median"


def test_the_search_preregisters_the_planted_head(setup):
    loaded, batches, nll_batches, tox, benign = setup
    layers = list(range(loaded.dims.n_layers))
    acts = scored_activations(loaded.model, loaded.adapter, batches, layers, loaded.dims.n_heads)
    labels = np.array([i % 2 == 1 for i in range(10)])
    w_fold, _ = folded_unembedding(loaded.adapter, loaded.model)
    logit_lens = {layer: (lambda x: x @ w_fold.T) for layer in layers}  # stands in for a trained lens here
    dirs = S.head_directions(loaded, acts, labels, tox, ("contrast", "unembed", "lens"), logit_lens)
    assert set(dirs) == {"contrast", "unembed", "lens"} and dirs["contrast"][1].shape == (4, 16)
    d_hat = S.unit_directions(dirs)
    sigma = S.sigmas(acts, d_hat)
    assert float(sigma["contrast"][PLANTED[0]][PLANTED[1]]) > 0
    proxy = expected_toxicity_proxy(tox)
    plan = SteeringConfig(sources=("contrast", "unembed"), edits=("steer",), alphas=(1.0, 3.0), sizes=(1, 2))
    rise = S.ppl_measure(loaded, benign, ppl_tokens=120, ppl_window=40, d_hat=d_hat, sigma=sigma)
    measure = S.exact_measure(loaded, batches, proxy, rise, d_hat=d_hat, sigma=sigma)
    choice = S.choose_steering(loaded, plan, batches, nll_batches, proxy, d_hat, sigma, budget=2, max_ppl_rel=0.5,
                               measure=measure)
    ranked_first = {r["source"]: None for r in choice.first_order}
    assert set(ranked_first) == {"contrast", "unembed"}
    assert choice.chosen is not None and PLANTED in choice.chosen.condition.heads
    assert choice.chosen.proxy_drop > 0 and choice.chosen.within_budget
    assert len(choice.trials) == 2 * 2 * 2  # sources x sizes x alphas (one edit)
    every = [(la, h) for la in layers for h in range(loaded.dims.n_heads)]
    loose = SteeringConfig(sources=("contrast",), edits=("steer", "reverse"), all_heads_alphas=(0.5, 1.0),
                           all_heads_ppl_rel=10.0)
    all_heads, all_trials = S.choose_all_heads(loose, every, measure)
    assert [(t.condition.edit, t.condition.alpha) for t in all_trials] == [("steer", 0.5), ("steer", 1.0),
                                                                         ("reverse", 0.5), ("reverse", 1.0)]
    assert all(t.condition.heads == tuple(every) for t in all_trials)
    assert all_heads is not None and all_heads.proxy_drop == max(t.proxy_drop for t in all_trials)


def test_evaluating_the_preregistered_steering_against_its_controls(setup):
    """The headline (the planted head steered along its contrast direction) lowers sampled toxicity on prompts
    holding the toxic word, ranks first among random head sets given the same edit, and every control and
    exploratory condition is reported beside it."""
    from loralens.config import InterveneConfig
    from loralens.lens.evaluation.scorers import get_scorer, primary_label
    from loralens.lens.evaluation.steering_search import Steering
    from loralens.tasks.evaluation import steering_evaluation as E

    loaded, batches, _nll, _tox, benign = setup
    layers = list(range(loaded.dims.n_layers))
    acts = scored_activations(loaded.model, loaded.adapter, batches, layers, loaded.dims.n_heads)
    labels = np.array([i % 2 == 1 for i in range(10)])
    w_fold, _ = folded_unembedding(loaded.adapter, loaded.model)
    dirs = S.head_directions(loaded, acts, labels, _tox, ("contrast", "unembed"), None)
    d_hat = S.unit_directions(dirs)
    sigma = S.sigmas(acts, d_hat)
    headline = Steering((PLANTED,), "steer", "contrast", 8.0)
    every = tuple((la, h) for la in layers for h in range(loaded.dims.n_heads))
    conds, randoms = E.conditions(headline, d_hat, sigma, layers=layers,
                                  random_sets=draw_random_sets(headline, layers, loaded.dims.n_heads, [0, 1, 2]),
                                  direction_seed=0, sources=("contrast", "unembed"), edits=("steer", "reverse"),
                                  all_heads=Steering(every, "steer", "contrast", 0.5))
    assert randoms == ["random0", "random1", "random2"]
    assert set(conds) == {"headline", *randoms, "random_direction", "reverse:contrast", "steer:unembed",
                          "reverse:unembed", "zero", "all_heads"}
    assert all(PLANTED not in conds[r][0].heads for r in randoms)
    scorer = get_scorer("jigsaw-lstm")
    ic = InterveneConfig(k=2, max_new_tokens=4, batch_prompts=4, ppl_tokens=100, ppl_window=50)
    prompts = [f"you are such an{TOXIC_WORD}, you{TOXIC_WORD}" for _ in range(6)]
    rows = E.evaluate(loaded, scorer, primary_label(scorer), prompts, ic, benign, conds, randoms, n_boot=20)
    by = {r["name"]: r for r in rows}
    head, base = by["headline"], by["baseline"]
    assert head["role"] == "headline" and {by[r]["role"] for r in randoms} == {"random"}
    assert by["zero"]["role"] == "exploratory" and by["zero"]["heads"] == "L1H2"
    assert by["all_heads"]["role"] == "all_heads" and "permutation_p" not in by["all_heads"]
    assert head["expected_max_toxicity"] < 0.5 * base["expected_max_toxicity"]
    assert all(by[r]["expected_max_toxicity"] > 0.9 * base["expected_max_toxicity"] for r in randoms)
    assert head["permutation_rank"] == 1 and head["n_random"] == 3 and head["permutation_p"] == 0.25
    assert all(r["ppl"] > 0 for r in rows)


def test_directions_file_and_records_round_trip(tmp_path):
    """The select stage's directions file gives back every source's per-layer directions and sigmas exactly, and a
    recorded trial (all-heads written "all") names the same condition again."""
    from loralens.lens.evaluation.steering_search import Steering, Trial
    from loralens.warehouse.steering_directions import read_directions, write_directions

    rng = np.random.default_rng(0)
    d_hat = {"contrast": {0: rng.normal(size=(4, 16)), 3: rng.normal(size=(4, 16))},
             "lens": {3: rng.normal(size=(4, 16))}}
    sigma = {s: {la: np.abs(rng.normal(size=4)) for la in by} for s, by in d_hat.items()}
    path = write_directions(tmp_path / "steering_directions.safetensors", d_hat, sigma)
    got_d, got_s = read_directions(path)
    assert {s: sorted(by) for s, by in got_d.items()} == {"contrast": [0, 3], "lens": [3]}
    assert np.allclose(got_d["contrast"][3], d_hat["contrast"][3].astype(np.float32))
    assert np.allclose(got_s["lens"][3], sigma["lens"][3].astype(np.float32))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_directions(tmp_path / "missing.safetensors")
    every = [(la, h) for la in (0, 3) for h in range(4)]
    few = Trial(Steering(((3, 1), (0, 2)), "reverse", "lens", 4.0), 0.01, 0.002, True)
    assert S.condition_from_record(S.trial_record(few), every) == few.condition
    lots = Trial(Steering(tuple(every), "steer", "contrast", 0.25), 0.02, 0.05, True)
    rec = S.trial_record(lots, all_heads=True)
    assert rec["heads"] == "all" and rec["name"] == "steer:contrast:a0.25:all"
    assert S.condition_from_record(rec, every) == lots.condition
