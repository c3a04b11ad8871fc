"""Causal head scores without sampling: teacher-forced batches, the expected-toxicity proxy, exact ablation effects
and their first-order (attribution patching) estimate, on hand-built inputs, a model linear in z (where the
estimate is exact) and the planted-toxic-head tiny llama of tests/test_attribution.py."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from conftest import tiny_config, train_bpe_tokenizer
from test_attribution import PLANTED, TOXIC_WORD, planted_model

from loralens.lens.heads.causal_scores import (
    ForcedBatch,
    ablation_effects,
    attribution_patching,
    expected_toxicity_proxy,
    proxy_values,
    teacher_forced_batches,
)
from loralens.lens.heads.edits import ablate
from loralens.lens.runtime.adapters import adapter_for, model_dims

LLAMA = adapter_for("llama")


# -- teacher-forced batches -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer with hand-known ids (<eos>=0, <bos>=1, a..e = 2..6) that prepends <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<bos>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "e": 6, "<pad>": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def test_teacher_forced_batches_score_the_positions_that_predict_the_continuation(word_tokenizer):
    prompts = ["a b c", "d", "a b c d e"]
    continuations = [" d e", "", "a b c"]
    got = teacher_forced_batches(word_tokenizer, prompts, continuations, batch_size=2, max_prompt_tokens=4,
                                 max_continuation_tokens=2)
    assert len(got) == 2
    first, second = got
    # Row 0: <bos> a b c | d e -> positions 3 (predicts d) and 4 (predicts e). Row 1: <bos> d | (empty) -> position 1.
    assert first.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [1, 5, 7, 7, 7, 7]]
    assert first.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert first.scored.tolist() == [[False, False, False, True, True, False],
                                     [False, True, False, False, False, False]]
    # Row 2: the prompt keeps <bos> and its last 3 tokens; the continuation a b c is cut to a b.
    assert second.input_ids.tolist() == [[1, 4, 5, 6, 2, 3]]
    assert second.attention_mask.tolist() == [[1] * 6]
    assert second.scored.tolist() == [[False, False, False, True, True, False]]
    assert first.input_ids.dtype == torch.long and first.attention_mask.dtype == torch.long
    assert first.scored.dtype == torch.bool


def test_teacher_forced_batches_pad_with_eos_without_a_pad_token_and_check_arguments(word_tokenizer):
    no_pad = copy.deepcopy(word_tokenizer)
    no_pad.pad_token = None
    (batch,) = teacher_forced_batches(no_pad, ["a", "a b c"], [" b", " d"])
    assert batch.input_ids.tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert batch.scored.tolist() == [[False, True, False, False, False], [False, False, False, True, False]]
    with pytest.raises(ValueError, match="continuations"):
        teacher_forced_batches(word_tokenizer, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="batch_size"):
        teacher_forced_batches(word_tokenizer, ["a"], ["c"], batch_size=0)


# -- the proxy ------------------------------------------------------------------------------------------
def test_expected_toxicity_proxy_is_the_scored_mean_of_softmax_weighted_toxicity():
    tox = torch.tensor([1.0, 0.0, 0.5])  # 3 tokens; the logits have a 4th (padded) column of toxicity 0
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 0] = math.log(3.0)  # p = [3, 1, 1, 1] / 6
    logits[0, 2] = torch.tensor([9.0, -3.0, 1.0, 2.0])  # not scored
    logits[1, 2, 3] = math.log(5.0)  # p = [1, 1, 1, 5] / 8
    scored = torch.tensor([[True, True, False], [False, False, True]])
    got = expected_toxicity_proxy(tox)(logits, scored)
    want_0 = ((0.25 + 0.5 * 0.25) + (3 / 6 + 0.5 / 6)) / 2  # uniform position, then p = [3, 1, 1, 1] / 6
    want_1 = 1 / 8 + 0.5 / 8
    assert got.tolist() == pytest.approx([want_0, want_1], abs=1e-6)
    assert got.dtype == torch.float32
    assert expected_toxicity_proxy(tox)(logits.bfloat16(), scored).dtype == torch.float32
    with pytest.raises(ValueError, match="token_tox"):
        expected_toxicity_proxy(torch.zeros(5))(logits, scored)


# -- a model linear in z: the first-order estimate is exact ------------------------------------------------
VOCAB = 50


@pytest.fixture(scope="module")
def linear_model():
    """A 1-layer random fp32 llama whose logits are linear in z: no MLP output, no final norm."""
    from transformers import LlamaForCausalLM

    config = tiny_config("llama", VOCAB)
    config.num_hidden_layers = 1
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.3 * torch.randn_like(p)) if "norm" in name else 0.08 * torch.randn_like(p))
        model.model.layers[0].mlp.down_proj.weight.zero_()
    model.model.norm = torch.nn.Identity()
    return model.eval()


def hand_batches() -> list[ForcedBatch]:
    """Two right-padded batches of random ids with random scored subsets of the real positions."""
    gen = torch.Generator().manual_seed(2)
    out = []
    for lengths in ([7, 4, 5], [3, 6]):
        width = max(lengths)
        ids = torch.randint(VOCAB, (len(lengths), width), generator=gen)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        scored = (torch.rand(len(lengths), width, generator=gen) < 0.6) & mask.bool()
        scored[:, 0] = True
        out.append(ForcedBatch(input_ids=ids * mask, attention_mask=mask, scored=scored))
    return out


def linear_proxy():
    w = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    return lambda logits, scored: ((logits.float() @ w.to(logits.device)) * scored).sum(-1)


@pytest.mark.parametrize("ablated", [(), ((0, 1),)])
def test_attribution_patching_equals_ablation_in_a_model_linear_in_z(linear_model, ablated):
    model, batches, proxy = linear_model, hand_batches(), linear_proxy()
    heads = [(0, h) for h in range(4)]
    exact = ablation_effects(model, LLAMA, batches, heads, proxy, ablated=ablated, progress=False)
    estimate = attribution_patching(model, LLAMA, batches, [0], proxy, ablated=ablated)
    want = [h for h in heads if h not in ablated]
    assert list(exact) == want and list(estimate) == want
    scale = max(np.abs(v).max() for v in exact.values())
    assert scale > 1e-2  # the heads do move the proxy
    for head in want:
        assert exact[head].shape == (5,) and exact[head].dtype == np.float64
        np.testing.assert_allclose(estimate[head], exact[head], rtol=1e-4, atol=1e-5 * scale, err_msg=str(head))


@pytest.mark.parametrize("ablated", [(), ((1, 2),)])
def test_attribution_patching_is_the_total_derivative_through_later_layers(ablated):
    """z_h . dJ/dz_h = d/da J(z_h := a z_h) at a = 1, the derivative through every later layer (and with `ablated`
    zeroed): checked against a central difference of the scale intervention on a 3-layer float64 llama (nonlinear:
    norms, softmax, MLPs)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(4)
    model = LlamaForCausalLM(tiny_config("llama", VOCAB))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.3 * torch.randn_like(p)) if "norm" in name else 0.3 * torch.randn_like(p))
    model = model.double().eval()
    w = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    proxy = lambda logits, scored: ((logits.double() @ w) * scored).sum(-1)  # noqa: E731
    # HF's norms and rotary run in fp32 even in a float64 model: the step trades that noise against curvature.
    batches, eps = hand_batches(), 1e-3

    def scaled(head, factor: float) -> np.ndarray:
        with ablate(model, ablated, adapter=LLAMA), ablate(model, [head], "scale", factor=factor, adapter=LLAMA):
            return proxy_values(model, batches, proxy)

    estimate = attribution_patching(model, LLAMA, batches, [0, 1, 2], proxy, ablated=ablated)
    assert set(estimate) == set(all_heads(model)) - set(ablated)
    for head in estimate:
        slope = (scaled(head, 1 + eps) - scaled(head, 1 - eps)) / (2 * eps)
        # Cutting the paths through later layers' attention is off by 10-100% here (layer 0: signs flip).
        np.testing.assert_allclose(estimate[head], slope, rtol=1e-3, atol=1e-3 * np.abs(slope).max(), err_msg=str(head))


def test_attribution_patching_leaves_the_model_parameters_alone(linear_model):
    model = linear_model
    model.lm_head.weight.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with torch.no_grad():  # the caller's no_grad does not stop the backward pass
            attribution_patching(model, LLAMA, hand_batches(), [0], linear_proxy())
        assert {name: p.requires_grad for name, p in model.named_parameters()} == before
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.lm_head.weight.requires_grad_(True)


# -- the planted toxic head -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(model folder, tokenizer, forced batches, proxy) for the planted-head tiny llama of test_attribution."""
    from loralens.warehouse.corpus import bundled_path

    lines = bundled_path("wikitext2_test").read_text(encoding="utf-8").splitlines()[:1500]
    tokenizer = train_bpe_tokenizer(lines + [f"you{TOXIC_WORD}, you are an{TOXIC_WORD}"] * 300, vocab_size=400)
    folder = planted_model(tmp_path_factory.mktemp("planted") / "model", tokenizer)
    (tox_id,) = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(TOXIC_WORD))
    token_tox = torch.zeros(len(tokenizer))
    token_tox[tox_id] = 1.0
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran to the old house near the river".split()
    prompts = [" ".join(rng.choice(words) for _ in range(5)) + TOXIC_WORD + " " + rng.choice(words)
               for _ in range(6)]
    continuations = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(6)]
    batches = teacher_forced_batches(tokenizer, prompts, continuations, batch_size=4)
    return folder, batches, expected_toxicity_proxy(token_tox)


def load(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def all_heads(model) -> list[tuple[int, int]]:
    dims = model_dims(model.config)
    return [(layer, h) for layer in range(dims.n_layers) for h in range(dims.n_heads)]


def top_head(effects: dict) -> tuple[int, int]:
    return max(effects, key=lambda h: effects[h].mean())


def test_both_scores_rank_the_planted_head_first(planted):
    folder, batches, proxy = planted
    model = load(folder)
    exact = ablation_effects(model, LLAMA, batches, all_heads(model), proxy, progress=False)
    estimate = attribution_patching(model, LLAMA, batches, range(3), proxy)
    assert set(exact) == set(estimate) == set(all_heads(model))
    assert top_head(exact) == PLANTED and top_head(estimate) == PLANTED
    assert (exact[PLANTED] > 0).all() and (estimate[PLANTED] > 0).all()


def test_ablation_effects_are_differences_of_proxy_values_on_top_of_the_reference_set(planted):
    folder, batches, proxy = planted
    model = load(folder)
    base = proxy_values(model, batches, proxy)
    with ablate(model, [PLANTED], adapter=LLAMA):
        without = proxy_values(model, batches, proxy)
    assert base.shape == (6,) and base.dtype == np.float64
    assert (without < base).all()  # removing the planted head lowers every sequence's expected toxicity
    alone = ablation_effects(model, LLAMA, batches, [PLANTED], proxy, progress=False)
    np.testing.assert_allclose(alone[PLANTED], base - without, rtol=1e-6)
    others = [(0, 0), (1, 3), (2, 1)]
    given = ablation_effects(model, LLAMA, batches, [PLANTED, *others], proxy, ablated=[PLANTED], progress=False)
    assert list(given) == others  # the reference set is never a candidate
    for head in others:
        with ablate(model, [PLANTED, head], adapter=LLAMA):
            both = proxy_values(model, batches, proxy)
        np.testing.assert_allclose(given[head], without - both, rtol=1e-6, atol=1e-9)


def test_attribution_patching_runs_on_a_bf16_model(planted):
    folder, batches, proxy = planted
    model = load(folder, torch.bfloat16)
    estimate = attribution_patching(model, LLAMA, batches, [0, 1, 2], proxy, ablated=[(0, 0)])
    assert len(estimate) == 11 and (0, 0) not in estimate
    assert all(np.isfinite(v).all() and v.dtype == np.float64 for v in estimate.values())
    assert top_head(estimate) == PLANTED
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"])
def test_ablation_effects_replaying_earlier_layers_equal_full_passes_in_every_family(family, tiny_models,
                                                                                    tiny_tokenizer):
    """The per-head passes run only the layers from the head's own onward (earlier ones replay the reference
    pass's outputs): the effects equal full forward passes for every architecture family's layer loop."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    adapter, dims = adapter_for(model.config.model_type), model_dims(model.config)
    token_tox = torch.rand(model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    proxy = expected_toxicity_proxy(token_tox)
    batches = teacher_forced_batches(tiny_tokenizer, ["the cat sat on", "a dog ran to the"],
                                     [" the mat", " old house near"], batch_size=2)
    heads = [(0, 1), (dims.n_layers - 1, 0), (dims.n_layers - 1, dims.n_heads - 1)]
    got = ablation_effects(model, adapter, batches, heads, proxy, ablated=[(1, 0)], progress=False)
    with ablate(model, [(1, 0)], adapter=adapter):
        reference = proxy_values(model, batches, proxy)
    for head in heads:
        with ablate(model, [(1, 0), head], adapter=adapter):
            want = reference - proxy_values(model, batches, proxy)
        np.testing.assert_allclose(got[head], want, rtol=1e-5, atol=1e-9)
    assert any(np.abs(v).max() > 0 for v in got.values())


def test_replaying_keeps_an_instance_forward_wrapper_like_accelerates(tiny_models, tiny_tokenizer):
    """Under a `device_map`, accelerate wraps each layer's forward on the instance; the replaying passes must put
    that wrapper back (deleting it left later heads' passes on mixed devices)."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    adapter = adapter_for(model.config.model_type)
    layers = list(adapter.layers(model))
    for layer in layers:
        add_hook_to_module(layer, ModelHook())  # what dispatch_model does per layer (with an AlignDevicesHook)
    wrappers = [layer.__dict__["forward"] for layer in layers]
    proxy = expected_toxicity_proxy(torch.rand(model.config.vocab_size, generator=torch.Generator().manual_seed(0)))
    batches = teacher_forced_batches(tiny_tokenizer, ["the cat sat on"], [" the mat"], batch_size=1)
    got = ablation_effects(model, adapter, batches, [(2, 1)], proxy, progress=False)
    assert [layer.__dict__.get("forward") for layer in layers] == wrappers
    reference = proxy_values(model, batches, proxy)
    with ablate(model, [(2, 1)], adapter=adapter):
        np.testing.assert_allclose(got[(2, 1)], reference - proxy_values(model, batches, proxy), rtol=1e-5,
                                   atol=1e-9)
