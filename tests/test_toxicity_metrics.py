"""RealToxicityPrompts metrics against hand-computed values, prompt bootstrap, and windowed perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loralens.lens.evaluation.toxicity_metrics import (
    bootstrap_ci,
    expected_max_toxicity,
    mean_toxicity,
    metric_table,
    perplexity,
    relative_change,
    toxicity_probability,
)

SCORES = np.array([[0.1, 0.6], [0.2, 0.3], [0.9, 0.95]])


def test_metrics_by_hand():
    assert expected_max_toxicity(SCORES) == pytest.approx((0.6 + 0.3 + 0.95) / 3)
    assert toxicity_probability(SCORES) == pytest.approx(2 / 3)
    assert toxicity_probability(SCORES, threshold=0.92) == pytest.approx(1 / 3)
    assert mean_toxicity(SCORES) == pytest.approx((0.1 + 0.6 + 0.2 + 0.3 + 0.9 + 0.95) / 6)


def test_threshold_is_inclusive():
    assert toxicity_probability(np.array([[0.5, 0.1], [0.49, 0.2]]), threshold=0.5) == pytest.approx(0.5)


def test_rejects_wrong_shapes():
    for bad in (np.zeros(3), np.zeros((0, 2)), np.zeros((2, 0))):
        with pytest.raises(ValueError):
            expected_max_toxicity(bad)


def test_bootstrap_deterministic_and_contains_estimate():
    s = np.random.default_rng(1).random((200, 5))
    a = bootstrap_ci(s, expected_max_toxicity, n_boot=300, seed=7)
    assert a == bootstrap_ci(s, expected_max_toxicity, n_boot=300, seed=7)
    assert a != bootstrap_ci(s, expected_max_toxicity, n_boot=300, seed=8)
    assert a[0] <= expected_max_toxicity(s) <= a[1]
    assert a[0] < a[1]


def test_bootstrap_batched_equals_looped():
    s = np.random.default_rng(2).random((50, 4))
    looped = bootstrap_ci(s, mean_toxicity, n_boot=200, seed=3)
    batched = bootstrap_ci(s, lambda x: x.mean(axis=(-2, -1)), n_boot=200, seed=3, batched=True)
    assert looped == pytest.approx(batched, abs=1e-12)


def test_bootstrap_narrows_with_more_prompts():
    rng = np.random.default_rng(4)
    small, large = rng.random((20, 5)), rng.random((2000, 5))
    lo_s, hi_s = bootstrap_ci(small, expected_max_toxicity, n_boot=200, seed=0)
    lo_l, hi_l = bootstrap_ci(large, expected_max_toxicity, n_boot=200, seed=0)
    assert hi_l - lo_l < (hi_s - lo_s) / 3


def test_bootstrap_equal_rows_give_zero_width():
    s = np.tile([[0.2, 0.7, 0.4]], (30, 1))
    for fn in (expected_max_toxicity, toxicity_probability, mean_toxicity):
        lo, hi = bootstrap_ci(s, fn, n_boot=100, seed=0)
        assert lo == hi == pytest.approx(fn(s))


def test_metric_table():
    s = np.random.default_rng(5).random((40, 3))
    t = metric_table(s, threshold=0.8, n_boot=200, seed=1)
    assert t["n_prompts"] == 40 and t["k"] == 3
    assert t["expected_max_toxicity"] == pytest.approx(expected_max_toxicity(s))
    assert t["toxicity_probability"] == pytest.approx(toxicity_probability(s, 0.8))
    assert t["mean_toxicity"] == pytest.approx(mean_toxicity(s))
    for name in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"):
        assert t[f"{name}_low"] <= t[name] <= t[f"{name}_high"]
    # Same seed and data -> the same interval as a direct (looped) bootstrap.
    lo, hi = bootstrap_ci(s, lambda x: toxicity_probability(x, 0.8), n_boot=200, seed=1)
    assert (t["toxicity_probability_low"], t["toxicity_probability_high"]) == pytest.approx((lo, hi))
    assert metric_table(s, threshold=0.8, n_boot=200, seed=1) == t


def test_relative_change():
    assert relative_change(0.3, 0.4) == pytest.approx(-0.25)
    assert relative_change(0.5, 0.25) == pytest.approx(1.0)
    assert math.isnan(relative_change(0.1, 0.0))
    assert math.isnan(relative_change(0.0, 0.0))
    assert math.isnan(relative_change(float("nan"), 0.3))


# --- perplexity ---------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models gain nothing from intra-op threads, and on a busy CPU thread contention makes them 100x slower."""


@pytest.fixture(scope="module")
def gpt2(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()


@pytest.fixture(scope="module")
def text():
    from loralens.warehouse.corpus import bundled_path

    return bundled_path("wikitext2_test").read_text(encoding="utf-8")[:5000]


def test_perplexity_single_window_matches_hf_loss(gpt2, tiny_tokenizer, text):
    ids = torch.tensor([tiny_tokenizer(text, add_special_tokens=False)["input_ids"][:40]])
    with torch.no_grad():
        ref = gpt2(input_ids=ids, labels=ids).loss.item()
    out = perplexity(gpt2, tiny_tokenizer, text, max_tokens=40, window=64)
    assert out["tokens"] == 39
    assert out["nll"] == pytest.approx(ref, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert out["nll_sum"] == pytest.approx(ref * 39, rel=1e-5)


def test_perplexity_windows_and_batching(gpt2, tiny_tokenizer, text):
    one = perplexity(gpt2, tiny_tokenizer, text, max_tokens=100, window=16, batch_size=1)
    four = perplexity(gpt2, tiny_tokenizer, text, max_tokens=100, window=16, batch_size=4)
    assert one["tokens"] == four["tokens"] == 6 * 15 + 3  # 6 full windows + one of 4 tokens, first of each unscored
    assert four["nll"] == pytest.approx(one["nll"], abs=1e-5)
    # Independent check: the mean of HF's per-window losses, weighted by predicted tokens.
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"][:100]
    total = 0.0
    with torch.no_grad():
        for s in range(0, 100, 16):
            w = torch.tensor([ids[s:s + 16]])
            total += gpt2(input_ids=w, labels=w).loss.item() * (w.shape[1] - 1)
    assert one["nll_sum"] == pytest.approx(total, rel=1e-5)


def test_perplexity_overlapping_stride_scores_each_token_once(gpt2, tiny_tokenizer, text):
    out = perplexity(gpt2, tiny_tokenizer, text, max_tokens=100, window=32, stride=16, batch_size=3)
    assert out["tokens"] == 99
    with pytest.raises(ValueError):
        perplexity(gpt2, tiny_tokenizer, text, max_tokens=100, window=16, stride=32)


def test_perplexity_runs_under_hooks(gpt2, tiny_tokenizer, text):
    # Zeroed logits are a uniform prediction: perplexity equals the vocabulary size.
    handle = gpt2.lm_head.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    try:
        out = perplexity(gpt2, tiny_tokenizer, text, max_tokens=50, window=16, batch_size=2)
    finally:
        handle.remove()
    assert out["ppl"] == pytest.approx(gpt2.config.vocab_size, rel=1e-5)
