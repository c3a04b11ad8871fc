"""RealToxicityPrompts-style sampling through the intervene stage's own `generate_joint`: shapes, limits,
reproducibility per (batch, seed), and nothing of the model's generation config leaking in."""

from __future__ import annotations

import copy

import pytest
import torch

from loralens.lens.evaluation.generation import (
    encode_prompts,
    generate_joint,
    hash_seed,
    prompt_batches,
    prompt_ids,
    sample_rows,
)

PROMPTS = [
    "The cat sat on the",
    "In 1998 the company announced that",
    "He said",
    "The first season of the show was broadcast in",
]
SETTINGS = dict(k=3, max_new_tokens=6, seed=11)


def joint(model, tokenizer, prompts=PROMPTS, batch_key=0, **kw):
    """One joint generate() over the prompts, as the intervene stage samples a prompt batch."""
    return generate_joint(model, tokenizer, prompts, batch_key=batch_key, **{**SETTINGS, **kw})


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


def test_prompt_batches():
    assert prompt_batches(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert prompt_batches(0, 3) == []


def test_shapes_and_max_new_tokens(model, tiny_tokenizer):
    out = joint(model, tiny_tokenizer)
    assert len(out) == len(PROMPTS)
    assert all(len(row) == 3 and all(isinstance(t, str) for t in row) for row in out)
    ids = sample_rows(model, tiny_tokenizer, [PROMPTS[0]] * 4, seed_key=0, max_new_tokens=5)
    assert len(ids) == 4 and all(len(r) <= 5 for r in ids)
    assert any(len(r) > 0 for r in ids)


def test_reproducible_and_seed_sensitive(model, tiny_tokenizer):
    a = joint(model, tiny_tokenizer)
    assert a == joint(model, tiny_tokenizer)
    assert a != joint(model, tiny_tokenizer, seed=12)
    # Resume after a kill: a batch run on its own, later batches first, gives the same texts; the key matters.
    assert joint(model, tiny_tokenizer, PROMPTS[2:], batch_key=2) == joint(model, tiny_tokenizer, PROMPTS[2:],
                                                                             batch_key=2)
    assert joint(model, tiny_tokenizer, batch_key=5) != a


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


def test_joint_batch_is_reproducible_and_keyed(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralens.lens.evaluation.generation import generate_joint

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    prompts = ["The cat sat", "A longer prompt about the river and the"]
    a = generate_joint(model, tok, prompts, batch_key=0, k=3, max_new_tokens=5)
    assert a == generate_joint(model, tok, prompts, batch_key=0, k=3, max_new_tokens=5)
    assert a != generate_joint(model, tok, prompts, batch_key=1, k=3, max_new_tokens=5)
    assert [len(x) for x in a] == [3, 3]
