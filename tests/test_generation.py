"""RealToxicityPrompts-style sampling through the intervene stage's own `generate_joint`: shapes, limits, one seed
per (base seed, prompt text, sample) whatever the batch or process, and nothing of the model's generation config
leaking in."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loralens.lens.evaluation.generation import (
    draw_tokens,
    generate_joint,
    hash_seed,
    nucleus_probs,
    prompt_batches,
    prompt_key,
    sample_rows,
    sample_seed,
)
from loralens.lens.runtime.tokens import encode_prompts, prompt_ids

PROMPTS = [
    "The cat sat on the",
    "In 1998 the company announced that",
    "He said",
    "The first season of the show was broadcast in",
]
SETTINGS = dict(k=3, max_new_tokens=6, seed=11)


def joint(model, tokenizer, prompts=PROMPTS, **kw):
    """One joint sampling over the prompts, as the intervene stage samples a prompt batch."""
    return generate_joint(model, tokenizer, prompts, **{**SETTINGS, **kw})


def in_batches(model, tokenizer, prompts, size, **kw):
    """Sample `prompts` in consecutive batches of `size`, as the stages do; return each prompt's texts."""
    return [row for r in prompt_batches(len(prompts), size) for row in joint(model, tokenizer,
                                                                              [prompts[i] for i in r], **kw)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models gain nothing from intra-op threads, and on a busy CPU thread contention makes them 100x slower."""


def load(tiny_models, family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tiny_models):
    return load(tiny_models, request.param)


@pytest.fixture(scope="module")
def gpt2(tiny_models):
    return load(tiny_models, "gpt2")


def test_hash_seed_is_stable_and_in_range():
    assert hash_seed(0, 1) == hash_seed(0, 1)
    assert hash_seed(0, 1) == 8003828004978139229  # fixed forever: resumed runs depend on it
    assert len({hash_seed(0, 1), hash_seed(1, 0), hash_seed(0, 2), hash_seed(0)}) == 4
    assert all(0 <= hash_seed(s, i) < 2**63 for s in range(5) for i in range(5))


def test_sample_seed_is_a_function_of_seed_prompt_and_sample():
    assert sample_seed(0, "He said", 1) == hash_seed(0, prompt_key("He said"), 1)
    assert sample_seed(0, "He said", 1) == 424229004046523195  # fixed forever: stored runs depend on it
    assert len({sample_seed(0, "He said", 0), sample_seed(0, "He said", 1), sample_seed(1, "He said", 0),
                sample_seed(0, "He said ", 0)}) == 4


def test_prompt_batches():
    assert prompt_batches(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert prompt_batches(0, 3) == []


def test_shapes_and_max_new_tokens(model, tiny_tokenizer):
    out = joint(model, tiny_tokenizer)
    assert len(out) == len(PROMPTS)
    assert all(len(row) == 3 and all(isinstance(t, str) for t in row) for row in out)
    ids = sample_rows(model, tiny_tokenizer, [PROMPTS[0]] * 4, [0, 1, 2, 3], max_new_tokens=5)
    assert len(ids) == 4 and all(len(r) <= 5 for r in ids)
    assert any(len(r) > 0 for r in ids)
    with pytest.raises(ValueError, match="seeds: one per row expected, got 1 for 2 rows"):
        sample_rows(model, tiny_tokenizer, PROMPTS[:2], [0])


def test_reproducible_and_seed_sensitive(model, tiny_tokenizer):
    a = joint(model, tiny_tokenizer)
    assert a == joint(model, tiny_tokenizer)
    assert a != joint(model, tiny_tokenizer, seed=12)
    assert all(len(set(row)) > 1 for row in a)  # each sample of a prompt has its own seed
    # A prompt's texts are its own: another order, other neighbours, or a batch of its own give the same texts.
    assert joint(model, tiny_tokenizer, PROMPTS[::-1]) == a[::-1]
    assert joint(model, tiny_tokenizer, PROMPTS[2:]) == a[2:]


def test_batch_size_never_changes_a_text(model, tiny_tokenizer):
    """The intervene stage's batch_prompts is an execution setting: batches of 1, 3 and 8 prompts (different
    padding, different neighbours) sample the same texts for every prompt."""
    prompts = [*PROMPTS, "A", "Why would", "She walked into the room and", "x y z"]
    one = in_batches(model, tiny_tokenizer, prompts, 1)
    assert in_batches(model, tiny_tokenizer, prompts, 8) == one
    assert in_batches(model, tiny_tokenizer, prompts, 3) == one
    assert in_batches(model, tiny_tokenizer, prompts, 3, seed=12) != one


def test_another_process_samples_the_same_texts(gpt2, tiny_models, tiny_tokenizer, tmp_path):
    """A worker process sampling its share of the prompts (one batch, other threads) gives the texts this process
    gives inside a larger batch."""
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    code = ("import json, sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "from loralens.lens.evaluation.generation import generate_joint; torch.set_num_threads(2); "
            f"m = AutoModelForCausalLM.from_pretrained({str(tiny_models['gpt2'])!r}).eval(); "
            f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r}); "
            f"print(json.dumps(generate_joint(m, t, {PROMPTS[1:3]!r}, **{SETTINGS!r})))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == joint(gpt2, tiny_tokenizer)[1:3]


def test_nucleus_probs_matches_hugging_face_top_p():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for top_p, temperature in ((0.9, 1.0), (0.5, 0.7), (1.0, 1.3), (1e-6, 1.0)):
        hf = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone())).softmax(-1)
        assert torch.allclose(nucleus_probs(logits, top_p, temperature), hf, atol=1e-7)
    assert (nucleus_probs(logits, 1e-6) > 0).sum(-1).tolist() == [1, 1, 1, 1]  # the most likely token stays


def test_draw_tokens_follows_each_rows_generator_and_probabilities():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    tokens = [draw_tokens(probs, gens).tolist() for _ in range(200)]
    assert {t[0] for t in tokens} == {1, 2} and {t[1] for t in tokens} == {3}  # never a zero-probability token
    # Row 0's draws do not depend on row 1: drawn alone with the same seed, the same tokens.
    alone = torch.Generator().manual_seed(1)
    assert [draw_tokens(probs[:1], [alone]).item() for _ in range(200)] == [t[0] for t in tokens]


def test_global_rng_untouched(gpt2, tiny_tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    joint(gpt2, tiny_tokenizer, PROMPTS[:2])
    assert torch.equal(torch.rand(3), expected)


def test_left_padding_and_truncation(tiny_tokenizer):
    short, long = "He said", "The first season of the show was broadcast in"
    batch = encode_prompts(tiny_tokenizer, [short, long], pad_token_id=0)
    n_short = len(prompt_ids(tiny_tokenizer, short))
    n_long = len(prompt_ids(tiny_tokenizer, long))
    assert batch["input_ids"].shape == (2, n_long)
    assert batch["attention_mask"][0].tolist() == [0] * (n_long - n_short) + [1] * n_short
    assert batch["input_ids"][0, -n_short:].tolist() == prompt_ids(tiny_tokenizer, short)
    assert batch["attention_mask"][1].all()
    # Left truncation keeps the end of the prompt.
    full = tiny_tokenizer(long)["input_ids"]
    assert prompt_ids(tiny_tokenizer, long, max_prompt_tokens=3) == full[-3:]
    assert prompt_ids(tiny_tokenizer, "") == [tiny_tokenizer.eos_token_id]


def test_tokenizer_left_unchanged(gpt2, tiny_tokenizer):
    side = tiny_tokenizer.padding_side
    tiny_tokenizer.padding_side = "right"
    try:
        joint(gpt2, tiny_tokenizer, PROMPTS[:2])
        assert tiny_tokenizer.padding_side == "right"
    finally:
        tiny_tokenizer.padding_side = side


def test_max_prompt_tokens_changes_only_long_prompts(gpt2, tiny_tokenizer):
    n = min(len(prompt_ids(tiny_tokenizer, p)) for p in PROMPTS)  # the shortest prompt fits exactly
    short = [p for p in PROMPTS if len(prompt_ids(tiny_tokenizer, p)) <= n]
    assert len(short) < len(PROMPTS)
    assert joint(gpt2, tiny_tokenizer, short, max_prompt_tokens=n) == joint(gpt2, tiny_tokenizer, short)
    assert joint(gpt2, tiny_tokenizer, max_prompt_tokens=n) != joint(gpt2, tiny_tokenizer)


def test_no_pad_token_falls_back_to_eos(gpt2, tiny_tokenizer):
    no_pad = copy.deepcopy(tiny_tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    assert joint(gpt2, no_pad, PROMPTS[:2]) == joint(gpt2, tiny_tokenizer, PROMPTS[:2])


def test_model_generation_config_cannot_override(tiny_models, tiny_tokenizer):
    clean = load(tiny_models, "gpt2")
    meddled = load(tiny_models, "gpt2")
    gc = meddled.generation_config
    gc.do_sample, gc.top_k, gc.top_p, gc.temperature = False, 1, 0.1, 0.2
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens = 50.0, 1, 6
    assert joint(meddled, tiny_tokenizer) == joint(clean, tiny_tokenizer)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gpt_neox"])
def test_other_families(tiny_models, tiny_tokenizer, family):
    m = load(tiny_models, family)
    a = joint(m, tiny_tokenizer, PROMPTS[:2])
    assert len(a) == 2 and all(len(r) == 3 for r in a)
    assert a == joint(m, tiny_tokenizer, PROMPTS[:2])


def test_joint_batch_is_reproducible_and_keyed_by_text(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    prompts = ["The cat sat", "A longer prompt about the river and the"]
    a = generate_joint(model, tok, prompts, k=3, max_new_tokens=5)
    assert a == generate_joint(model, tok, prompts, k=3, max_new_tokens=5)
    assert [len(x) for x in a] == [3, 3]
    # The same text twice in one batch is the same prompt: the same samples.
    twice = generate_joint(model, tok, [prompts[0], prompts[0]], k=3, max_new_tokens=5)
    assert twice == [a[0], a[0]]


def reference_sample(logits, top_p, temperature, generators):
    """The reference sampler: a full-vocabulary sort (`nucleus_probs`), then the full-vocabulary CDF."""
    return draw_tokens(nucleus_probs(logits, top_p, temperature), generators)


def random_logits(vocab: int, seed: int) -> torch.Tensor:
    """`[24, vocab]` rows from flat to peaked, heavy-tailed, and with tied scores (rounded to integers)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(vocab, generator=g) * scale for scale in (0.5, 1, 2, 4, 8, 16)]
    gumbel = -torch.log(-torch.log(torch.rand(6, vocab, generator=g).clamp(1e-12, 1 - 1e-7)))
    rows += list(gumbel * torch.tensor([1.0, 2, 3, 5, 8, 12])[:, None])
    rows += [torch.randn(vocab, generator=g).mul(s).round() for s in (1, 2, 3, 4, 6, 9)]  # ties everywhere
    rows += [torch.randn(vocab, generator=g).mul(3).round().div(4) for _ in range(6)]
    return torch.stack(rows)


def test_nucleus_sample_matches_the_full_sort_reference(monkeypatch):
    """The fast path (top-k prefixes, full sort only for open rows, CDF over the kept tokens) keeps exactly the
    reference's tokens and, for the same uniforms, draws exactly the reference's token, on every path."""
    from loralens.lens.evaluation import generation as G

    paths = {"prefix": 0, "sort": 0}
    settings = ((0.9, 1.0), (0.5, 0.7), (0.95, 1.3), (0.99, 1.0), (1.0, 1.0), (1e-6, 1.0), (0.0, 1.0))
    for vocab, prefixes, cases in ((49152, G.NUCLEUS_PREFIXES, settings[:1]), (3000, (8, 64), settings),
                                   (3000, (4,), settings), (500, (500,), settings)):
        monkeypatch.setattr(G, "NUCLEUS_PREFIXES", prefixes)
        for seed, (top_p, temperature) in enumerate(cases):
            logits = random_logits(vocab, seed)
            scores = logits / temperature
            groups, open_rows = G._nucleus_groups(scores, scores.softmax(-1), top_p)
            paths["prefix"] += sum(len(rows) for rows, _, _ in groups)
            paths["sort"] += len(open_rows)
            assert torch.equal(G.nucleus_keep(scores, top_p), G._kept_by_sort(scores, top_p))
            for u in (torch.rand(len(logits), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)),
                      torch.zeros(len(logits), dtype=torch.float64),
                      torch.full((len(logits),), 1 - 2**-53, dtype=torch.float64)):  # the largest torch.rand draws
                monkeypatch.setattr(G, "_uniforms", lambda gens, device, u=u: u.to(device))
                assert torch.equal(G.nucleus_sample(logits, top_p, temperature, [None] * len(logits)),
                                   reference_sample(logits, top_p, temperature, [None] * len(logits)))
    assert paths["prefix"] > 100 and paths["sort"] > 100  # both the prefix and the full-sort path were compared


def test_nucleus_sample_draws_the_reference_tokens_from_real_generators():
    """With real per-row generators, 50 draws of each row: the same token sequence as the reference sampler."""
    from loralens.lens.evaluation.generation import nucleus_sample

    logits = random_logits(4096, 7)
    fast = [torch.Generator().manual_seed(s) for s in range(len(logits))]
    slow = [torch.Generator().manual_seed(s) for s in range(len(logits))]
    for _ in range(50):
        assert torch.equal(nucleus_sample(logits, 0.9, 1.0, fast), reference_sample(logits, 0.9, 1.0, slow))


def test_sample_rows_draws_what_the_reference_sampler_draws(model, tiny_tokenizer, monkeypatch):
    """The whole loop with the fast sampler gives the ids it gives with the reference one (the loop before).
    That a text does not depend on the batch size (1, 3 or 8 prompts) is test_batch_size_never_changes_a_text."""
    from loralens.lens.evaluation import generation as G

    rows = [p for p in PROMPTS for _ in range(3)]
    seeds = list(range(len(rows)))
    fast = sample_rows(model, tiny_tokenizer, rows, seeds, max_new_tokens=8)
    monkeypatch.setattr(G, "nucleus_sample", reference_sample)
    assert sample_rows(model, tiny_tokenizer, rows, seeds, max_new_tokens=8) == fast
    assert sum(len(r) for r in fast) > len(rows)  # a real comparison: tokens were drawn
