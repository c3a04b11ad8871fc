"""Readable lenses on a planted copying head (issue 21): the tiny 2-layer Llama of tests/test_mechanisms.py, whose
L1H2 attends to the previous occurrence of the current token and writes the token after it (its embedding) into the
residual stream. A lens bank trained with the project's own objective (`LensSet`, the train stage's default form,
rank and objective) on that model's repeated random tokens must still read the copied token off the head: at >= 90%
of second-copy positions, top-1 through the trained lens; and every planted head's own lens beats its logit lens in
held-out KL."""

from __future__ import annotations

import pytest
import torch
from test_mechanisms import INDUCTION, PREV, H, L, planted_model, unique_repeats

from loralens.config.lens import TrainConfig
from loralens.lens.evaluation.mechanisms import mechanism_scores
from loralens.lens.heads.hooks import capture
from loralens.lens.lenses.lens_set import FoldedUnembed, LensConfig
from loralens.lens.lenses.objective import LensBatch, LensSet, fidelity
from loralens.lens.runtime.adapters import adapter_for, folded_unembedding, model_dims, norm_scale, out_proj_weight

pytestmark = pytest.mark.usefixtures("one_thread_module")
LAYERS = [0, 1]


def batch_of(model, tokens: torch.Tensor) -> LensBatch:
    """Return the LensBatch of every position of `tokens` `[B, T]` (what the cache stage stores per token)."""
    adapter = adapter_for("llama")
    with torch.no_grad(), capture(model, adapter, LAYERS) as cap:
        model(input_ids=tokens, use_cache=False)
    resid = cap.final_resid.reshape(-1, cap.final_resid.shape[-1])
    return LensBatch(z=torch.stack([cap.z[layer].reshape(len(resid), -1) for layer in LAYERS], 1),
                     scale=norm_scale(adapter, model, resid).squeeze(-1), mask=torch.ones(len(resid), dtype=torch.bool),
                     h_final=adapter.final_norm(model)(resid).float())


@pytest.fixture(scope="module")
def trained():
    """The planted model and a LensSet over both layers trained as the train stage does by default."""
    torch.manual_seed(0)
    model = planted_model()
    adapter, dims = adapter_for("llama"), model_dims(model.config)
    t = TrainConfig()
    unembed = FoldedUnembed(*folded_unembedding(adapter, model))
    w_o = torch.stack([out_proj_weight(adapter, model, layer, dims).float() for layer in LAYERS])
    lens_set = LensSet(unembed, w_o, LAYERS, LensConfig(form=t.form, rank=t.rank, alpha=t.alpha,
                                                        objective=t.objective),
                       lm_head=model.lm_head.weight.float(), loss=t.loss, chunk=64, base_dtype="float32")
    opt = torch.optim.AdamW([p for p in lens_set.parameters() if p.requires_grad], lr=t.lr, weight_decay=0.0)
    for step in range(60):
        loss = lens_set(batch_of(model, unique_repeats(8, 100 + step)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, lens_set


def test_planted_copying_head_reads_its_copied_token_through_the_trained_lens(trained):
    model, lens_set = trained
    banks = dict(zip(LAYERS, lens_set.banks, strict=True))
    s = mechanism_scores(model, adapter_for("llama"), model_dims(model.config), unique_repeats(6, 1), L, 1, banks)
    assert s.copy_top1_trained[INDUCTION].item() >= 0.9
    assert s.copy_top1_trained[INDUCTION].item() >= s.copy_top1_logit[INDUCTION].item() - 1e-9
    others = [s.copy_top1_trained[layer, h].item() for layer in LAYERS for h in range(H) if (layer, h) != INDUCTION]
    assert max(others) < 0.5  # the copied token is read off the copying head, not off every head


def test_planted_heads_lenses_beat_their_logit_lens_in_held_out_kl(trained):
    model, lens_set = trained
    fid = fidelity(lens_set, batch_of(model, unique_repeats(6, 2)))
    for layer, head in (PREV, INDUCTION):
        i = LAYERS.index(layer)
        assert fid["head_lens"][i, head] < fid["head_logit_lens"][i, head]


def test_report_counts_heads_whose_own_lens_beats_the_logit_lens():
    from loralens.tasks.report import fidelity_markdown

    fid = {"tokens": 10, "layers": [3, 5], "head_lens": [[1.0, 2.0], [0.5, 4.0]],
           "head_logit_lens": [[2.0, 2.0], [1.0, 3.0]], "layer_lens": [1.0, 1.0], "layer_logit_lens": [2.0, 2.0],
           "layer_subset_kl": [0.0, 0.0]}
    text = fidelity_markdown(fid)
    assert "**2 of 4 heads**" in text  # equal KL (ratio 1) is not better
    assert "median 0.750, range 0.500-1.333" in text


def test_read_outs_of_an_untrained_bank_and_relative_to_the_layer():
    from loralens.lens.lenses.lens_set import LensBank
    from loralens.lens.lenses.readout import READOUTS, head_readouts, relative_to_layer

    g = torch.Generator().manual_seed(0)
    unembed = FoldedUnembed(torch.randn(50, 8, generator=g))
    bank = LensBank(unembed, 3, LensConfig(rank=2), layer=0)
    x = torch.randn(5, 3, 8, generator=g)
    out = head_readouts(bank, x)
    assert tuple(out) == READOUTS and all(v.shape == (5, 3, 50) for v in out.values())
    assert torch.equal(out["lens"], out["logit"])  # untrained: the lens is the logit lens
    assert torch.allclose(out["relative"], out["logit_relative"])
    assert torch.allclose(out["logit_relative"].sum(1), torch.zeros(5, 50), atol=1e-5)  # relative to the layer's mean
    # A part every head shares (e.g. the joint objective's equal per-head biases) cancels.
    with torch.no_grad():
        bank.bias += torch.randn(50, generator=g)
    assert torch.allclose(head_readouts(bank, x)["relative"], relative_to_layer(out["logit"]), atol=1e-5)


def test_joint_objective_gives_every_head_of_a_layer_the_same_bias(trained):
    """The joint loss sees only the sum of a layer's biases, so each head's bias gets the same gradient: a head's
    bias is its layer's prior divided by H, the same for every head (why `relative` read-outs cancel it)."""
    _, lens_set = trained
    for bank in lens_set.banks:
        assert bank.bias.abs().max() > 1e-3  # trained
        assert torch.allclose(bank.bias, bank.bias[:1].expand_as(bank.bias), atol=1e-6)
