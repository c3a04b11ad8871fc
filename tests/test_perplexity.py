"""Windowed perplexity against Hugging Face's own loss: one window, many, overlapping, batched, under hooks."""

from __future__ import annotations

import math

import pytest
import torch

from loralens.lens.evaluation.perplexity import perplexity


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
