"""First-order steering effects against exact edits (finite differences) on a tiny llama, the NLL objective against
the model's own loss, and the fluency-aware score on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from loralens.lens.heads.causal_scores import (
    ForcedBatch,
    expected_toxicity_proxy,
    forced_objective,
    proxy_values,
    teacher_forced_batches,
)
from loralens.lens.heads.edits import HeadIntervention, intervene
from loralens.lens.heads.steering_scores import first_order_edit_effects, fluency_aware_score, nll_objective
from loralens.lens.runtime.adapters import adapter_for, model_dims

LLAMA = adapter_for("llama")


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tiny_tokenizer))).eval()
    batches = teacher_forced_batches(tiny_tokenizer, ["The cat sat on", "A river ran", "It was"],
                                     [" the mat today", " past the old mill", " a dark night"], batch_size=2)
    tox = torch.rand(len(tiny_tokenizer), generator=torch.Generator().manual_seed(1))
    return model, batches, expected_toxicity_proxy(tox)


def exact_change(model, batches, proxy, head, kind, d, strength) -> np.ndarray:
    """Return J(edited) - J(plain) per sequence for one head's edit at `strength`."""
    plain = proxy_values(model, batches, proxy)
    iv = HeadIntervention(kind, [head], factor=strength, z_directions={head: d})
    with intervene(model, LLAMA, iv):
        return proxy_values(model, batches, proxy) - plain


def test_first_order_effects_match_small_exact_edits(setup):
    model, batches, proxy = setup
    dims = model_dims(model.config)
    g = torch.Generator().manual_seed(2)
    d_hat = {layer: torch.nn.functional.normalize(torch.randn(dims.n_heads, dims.d_head, generator=g), dim=-1)
             for layer in (0, 1)}
    got = first_order_edit_effects(model, LLAMA, batches, d_hat, forced_objective(proxy), progress=False)
    assert set(got) == {"steer", "reverse"} and len(got["steer"]) == 2 * dims.n_heads
    eps = {"steer": 1e-2, "reverse": 1e-1}  # reverse is linear in its factor until z . d_hat changes sign
    for head in [(0, 1), (1, 2)]:
        d = d_hat[head[0]][head[1]]
        for kind in ("steer", "reverse"):
            exact = exact_change(model, batches, proxy, head, kind, d, eps[kind]) / eps[kind]
            # proxy_values is a mean over scored positions; the first-order terms are of the same J
            scale = np.abs(exact).max()
            assert scale > 2e-5
            # J is fp32 (~1e-6 resolution at this eps): agree within 10% of each value, or 5% of the largest
            np.testing.assert_allclose(got[kind][head], exact, rtol=0.1, atol=0.05 * scale)


def test_nll_objective_is_the_models_loss_on_the_scored_positions(setup, tiny_tokenizer):
    model, _, _ = setup
    batch = teacher_forced_batches(tiny_tokenizer, [""], [" The river ran past the old mill"])[0]
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids)
        got = nll_objective()(out.logits, batch)
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(float(out.loss), rel=1e-5)  # scored = every position predicting a token
    no_scores = ForcedBatch(batch.input_ids, batch.attention_mask, torch.zeros_like(batch.scored))
    assert float(nll_objective()(out.logits, no_scores)[0]) == 0.0


def test_fluency_aware_score_divides_by_the_rise_never_by_zero():
    tox = np.array([-0.2, -0.2, -0.1, 0.1])
    nll = np.array([0.1, 0.4, -0.5, 0.2])
    # floor = 0.1 * median(|nll|) = 0.1 * 0.3 = 0.03
    np.testing.assert_allclose(fluency_aware_score(tox, nll), [2.0, 0.5, 0.1 / 0.03, -0.5])
    np.testing.assert_allclose(fluency_aware_score(tox, nll, floor=0.2), [1.0, 0.5, 0.5, -0.5])
