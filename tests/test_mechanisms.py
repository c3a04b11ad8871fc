"""Mechanism checks on known answers: the score functions on hand-made attention patterns, and a tiny 2-layer Llama
with a planted previous-token head and a planted induction head (weights set by hand, no training, no mocks).

The planted model (vocab 32, d_model 64 = a token subspace, dims 0-31, and a previous-token subspace, dims 32-63;
4 query heads of d_head 64 over 2 KV heads; MLPs zeroed; norm gains 1; unembedding = embedding = one-hot rows):

    L0H0  previous-token head: constant query and key (biases) on the fastest RoPE pairs, the key rotated one
          position ahead, so q_i . k_j peaks at j = i - 1; it writes the attended token into the previous-token
          subspace.
    L1H2  induction head (K-composition with L0H0): its query reads the current token, its key the previous-token
          subspace, both on RoPE pairs too slow to rotate over the sequence, so position i attends to the j whose
          previous token is token i, i.e. j = i - L + 1 in the second copy; it writes the attended token into the
          token subspace, which the unembedding reads: it copies the next token.

Every other head has a zero query (uniform causal attention) and a zero output.
"""

from __future__ import annotations

import pytest
import torch

from loralens.lens.evaluation.mechanisms import (
    INDUCTION_THRESHOLD,
    copy_rows,
    head_copy_counts,
    hit_rates,
    induction_score,
    induction_summary,
    mechanism_rows,
    mechanism_scores,
    prev_token_score,
    repeated_tokens,
    stripe_score,
    summary_line,
)
from loralens.lens.lenses.lens_set import FoldedUnembed, LensBank
from loralens.lens.runtime.adapters import adapter_for, model_dims

V, D, H, KV, DH, L = 32, 64, 4, 2, 64, 8
PREV, INDUCTION = (0, 0), (1, 2)

pytestmark = pytest.mark.usefixtures("one_thread_module")


# -- score functions on hand-made patterns -------------------------------------------------------------------
def one_hot_pattern(T: int, key_of) -> torch.Tensor:
    """Return a `[T, T]` pattern attending from each query i to key `key_of(i)` (clipped to 0..i)."""
    attn = torch.zeros(T, T)
    for i in range(T):
        attn[i, min(max(key_of(i), 0), i)] = 1.0
    return attn


def test_scores_on_hand_made_patterns():
    T, off = 1 + 2 * L, 1
    prev = one_hot_pattern(T, lambda i: i - 1)
    induct = one_hot_pattern(T, lambda i: i - L + 1)
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    attn = torch.stack([prev, induct, uniform])[None].expand(2, 3, T, T)  # [B=2, H=3, T, T]
    # The induction pattern (clipped to key 0 before i = L - 1) attends to i - 1 only at i = 1: 1 of T - 1 queries.
    expected_prev = torch.tensor([1.0, 1 / (T - 1), (1 / torch.arange(2.0, T + 1)).mean()])
    assert torch.allclose(prev_token_score(attn), expected_prev)
    # Induction: second-copy queries 1 + L .. 2L attend to i - L + 1; the uniform head puts 1/(i+1) there.
    second = torch.arange(off + L, T)
    expected_uniform = (1 / (second + 1.0)).mean()
    assert torch.allclose(induction_score(attn, L, off), torch.tensor([0.0, 1.0, expected_uniform]))
    # A half-and-half head scores 0.5 on both; a leading layer dimension is kept.
    half = (prev + induct) / 2
    half[:L + 1] = prev[:L + 1]  # first copy: no earlier occurrence
    both = torch.stack([attn, half[None, None].expand(2, 3, T, T)])  # [NL=2, B, H, T, T]
    assert torch.allclose(induction_score(both, L, off)[1], torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="lag"):
        stripe_score(attn, L, L - 1)


def test_repeated_tokens_and_copy_rows():
    t = repeated_tokens(50, L, 6, seed=3, exclude=[0, 1, 2], bos=1)
    assert t.shape == (6, 1 + 2 * L) and (t[:, 0] == 1).all()
    assert torch.equal(t[:, 1:1 + L], t[:, 1 + L:]) and t[:, 1:].min() >= 3 and t.max() < 50
    assert torch.equal(t, repeated_tokens(50, L, 6, seed=3, exclude=[0, 1, 2], bos=1))
    assert not torch.equal(t, repeated_tokens(50, L, 6, seed=4, exclude=[0, 1, 2], bos=1))
    assert repeated_tokens(50, L, 2, seed=0).shape == (2, 2 * L)
    rows = copy_rows(L, 1)
    assert (rows.start, rows.stop) == (1 + L, 2 * L)  # the last second-copy position has no next token


def test_hit_rates_counts_top1_and_topk():
    logits = torch.tensor([[[0.0, 3, 2, 1], [5, 0.5, 0.2, 0.1]],  # [n=2, H=2, V=4], no ties
                           [[1, 0, 0.5, 2], [0.3, 0.1, 1, 0.2]]])
    top1, top2 = hit_rates(logits, torch.tensor([2, 0]), k=2)
    assert top1.tolist() == [0, 0] and top2.tolist() == [2, 1]
    top1, top2 = hit_rates(logits, torch.tensor([1, 2]), k=2)
    assert top1.tolist() == [1, 1] and top2.tolist() == [1, 2]


def test_copy_counts_trained_bank_differs_from_logit_lens():
    """An untrained bank reads as the logit lens; a bank whose bias favours one token reads that token instead."""
    torch.manual_seed(0)
    unembed = FoldedUnembed(torch.eye(8))
    w_o = torch.eye(8).reshape(2, 4, 8)  # head 0 writes dims 0-3, head 1 dims 4-7
    z = torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), 8).float() * 4
    z[:, 4:6] = torch.tensor([2.0, 1.0])  # head 1 always reads tokens 4 then 5: never a target
    targets = torch.tensor([1, 2, 3])
    bank = LensBank(unembed, 2)
    counts = head_copy_counts(z, torch.ones(3), w_o, targets, unembed, bank, k=2, chunk=2)
    assert counts["logit"][0].tolist() == [3, 0] and torch.equal(counts["trained"][0], counts["logit"][0])
    with torch.no_grad():
        bank.bias[0, 7] = 100.0
    counts = head_copy_counts(z, torch.ones(3), w_o, targets, unembed, bank, k=2, chunk=2)
    assert counts["trained"][0].tolist() == [0, 0] and counts["trained"][1].tolist() == [3, 0]
    assert set(head_copy_counts(z, torch.ones(3), w_o, targets, unembed, None, k=2, chunk=8)) == {"logit"}


# -- the planted model -----------------------------------------------------------------------------------
def rope_pairs(indices: list[int]) -> list[int]:
    """Return the head dims of RoPE pairs `indices` (HF's rotate_half layout pairs dim p with p + DH/2)."""
    return indices + [p + DH // 2 for p in indices]


def planted_model():
    """Return the tiny 2-layer Llama of the module docstring (eval, fp32)."""
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=V, hidden_size=D, num_attention_heads=H, num_key_value_heads=KV, head_dim=DH,
                        intermediate_size=16, num_hidden_layers=2, max_position_embeddings=64, attention_bias=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e10}, tie_word_embeddings=False,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    tok, prv = torch.arange(V), V + torch.arange(V)  # the two residual subspaces
    slow = torch.tensor(rope_pairs(list(range(16, 32))))  # 32 dims whose RoPE angle stays < 1e-3 over 64 positions
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        model.model.embed_tokens.weight[torch.arange(V), tok] = 1.0
        model.lm_head.weight[torch.arange(V), tok] = 1.0
        # L0H0: previous-token head. Layer-0 normed residual = 8 * one-hot(token).
        a0 = model.model.layers[0].self_attn
        q0 = torch.zeros(DH)
        q0[rope_pairs([0, 1, 2, 3])[:4]] = 10.0  # fast pairs, angles 1, .49, .24, .12 rad per position
        cos, sin = model.model.rotary_emb(q0[None, None], torch.tensor([[1]]))
        k0 = q0 * cos[0, 0] + torch.cat([-q0[DH // 2:], q0[:DH // 2]]) * sin[0, 0]  # q0 rotated one position
        a0.q_proj.bias[:DH] = q0
        a0.k_proj.bias[:DH] = k0
        a0.v_proj.weight[torch.arange(V), tok] = 1.0  # KV head 0 values: the token
        a0.o_proj.weight[prv, torch.arange(V)] = 1 / 8  # head 0 writes it into the previous-token subspace
        # L1H2: induction head. Layer-1 normed residual ~ 5.7 * (one-hot(token) + one-hot'(previous token)).
        a1 = model.model.layers[1].self_attn
        a1.q_proj.weight[2 * DH + slow, tok] = 4.0
        a1.k_proj.weight[DH + slow, prv] = 1.0  # KV head 1 keys: the previous token
        a1.v_proj.weight[DH + torch.arange(V), tok] = 1.0  # KV head 1 values: the token
        a1.o_proj.weight[tok, 2 * DH + torch.arange(V)] = 1.0  # head 2 writes it into the token subspace
    return model.requires_grad_(False)


def unique_repeats(batch: int, seed: int) -> torch.Tensor:
    """Return `[B, 1 + 2L]` ids `[0] + r + r` with r distinct non-BOS tokens, so each token has one occurrence."""
    g = torch.Generator().manual_seed(seed)
    r = torch.stack([1 + torch.randperm(V - 1, generator=g)[:L] for _ in range(batch)])
    return torch.cat([torch.zeros(batch, 1, dtype=torch.long), r, r], dim=1)


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, mechanism_scores(model, adapter_for("llama"), model_dims(model.config), unique_repeats(6, 0), L, 1)


def test_planted_previous_token_head_is_found(planted):
    _, s = planted
    assert s.prev_token[PREV].item() > 0.9
    assert divmod(s.prev_token.argmax().item(), H) == PREV
    assert s.induction[PREV].item() < 0.1


def test_planted_induction_head_is_found_and_copies(planted):
    _, s = planted
    assert s.induction[INDUCTION].item() > 0.9
    assert divmod(s.induction.argmax().item(), H) == INDUCTION
    assert s.copy_top1_logit[INDUCTION].item() >= 0.9
    assert s.copy_top5_logit[INDUCTION].item() >= s.copy_top1_logit[INDUCTION].item()
    others = [s.copy_top1_logit[layer, h].item() for layer in range(2) for h in range(H) if (layer, h) != INDUCTION]
    assert max(others) < 0.5  # zero-output heads read as all-zero logits: top-1 is token 0, never a target
    assert s.model_top1 >= 0.9  # the model itself predicts the repeat through the planted circuit
    assert s.n_positions == 6 * (L - 1)
    assert not s.has_trained and torch.isnan(s.copy_top1_trained).all()


def test_planted_sdpa_model_keeps_its_attention_and_rows(planted):
    model, s = planted
    assert model.config._attn_implementation == "sdpa"  # eager only during the measurement
    rows = mechanism_rows(s)
    assert len(rows) == 2 * H and rows[INDUCTION[0] * H + INDUCTION[1]]["layer"] == 1
    best = max(rows, key=lambda r: r["induction_score"])
    assert (best["layer"], best["head"]) == INDUCTION and best["copy_top1_trained"] is None


def test_planted_with_trained_banks(planted):
    """With banks, the trained columns are filled for the banked layers only; an untrained bank equals the logit
    lens."""
    model, _ = planted
    adapter, dims = adapter_for("llama"), model_dims(model.config)
    from loralens.lens.runtime.adapters import folded_unembedding

    bank = LensBank(FoldedUnembed(*folded_unembedding(adapter, model)), H, layer=1)
    s = mechanism_scores(model, adapter, dims, unique_repeats(4, 1), L, 1, {1: bank})
    assert s.has_trained and torch.isnan(s.copy_top1_trained[0]).all()
    assert torch.equal(s.copy_top1_trained[1], s.copy_top1_logit[1])
    assert s.copy_top1_trained[INDUCTION].item() >= 0.9


def test_planted_effect_reads_the_circuit_through_later_layers(planted):
    """The effect read-out (what a head adds to the model's output) names the copied token for both heads of the
    circuit: the induction head, and the previous-token head, which writes only into the subspace the induction
    head's key reads, so no read-out of its own output sees the copy; an inert head adds nothing."""
    model, without = planted
    s = mechanism_scores(model, adapter_for("llama"), model_dims(model.config), unique_repeats(6, 0), L, 1,
                         mean_tokens=unique_repeats(6, 1))
    assert torch.isnan(without.copy_top1_effect).all() and torch.isnan(without.copy_top5_effect).all()
    assert s.copy_top1_effect[INDUCTION].item() >= 0.9 and s.copy_top1_effect[PREV].item() >= 0.9
    assert s.copy_top1_logit[PREV].item() < 0.5  # its own output, read directly, does not name the copy
    assert (s.copy_top5_effect >= s.copy_top1_effect).all()
    inert = [s.copy_top5_effect[layer, h].item() for layer in range(2) for h in range(H)
             if (layer, h) not in (PREV, INDUCTION)]
    assert max(inert) < 0.5  # a zero read-out ranks token 0 (BOS) first, never a target
    rows = mechanism_rows(s)
    summary = induction_summary(rows)
    assert summary["n_with_effect"] == 1 and summary["n_effect_ge_logit_top1"] == 1
    assert summary["best_copier"]["effect"]["head"] == "L0H0"  # the first on ties: the previous-token head
    assert "effect >= logit lens at top-1 on 1 of 1" in summary_line(summary)


# -- the summary on hand-made rows -----------------------------------------------------------------------------
def head_row(layer: int, head: int, induction: float, logit: tuple[float, float],
             trained: tuple[float, float] | None, effect: tuple[float, float] | None = None) -> dict:
    """Return a `mechanism_rows` dict: copy rates (top-1, top-5) through each read-out; None: not measured."""
    t1, t5 = trained or (None, None)
    e1, e5 = effect or (None, None)
    return {"layer": layer, "head": head, "induction_score": induction, "prev_token_score": 0.0,
            "copy_top1_logit": logit[0], "copy_top5_logit": logit[1], "copy_top1_trained": t1,
            "copy_top5_trained": t5, "copy_top1_effect": e1, "copy_top5_effect": e5}


def test_induction_summary_counts_on_hand_made_rows():
    rows = [head_row(0, 0, 0.3, (0.2, 0.5), (0.2, 0.4)),  # at the threshold exactly: tie at top-1, worse at top-5
            head_row(0, 1, 0.2999, (0.9, 0.9), (0.9, 0.9)),  # just below: not an induction head, copies best
            head_row(1, 0, 0.8, (0.0, 0.0), (0.0, 0.1)),  # both zero at top-1, trained better at top-5
            head_row(1, 1, 0.5, (0.1, 0.3), (0.3, 0.6)),  # trained better at both
            head_row(2, 0, 0.6, (0.4, 0.7), None)]  # no trained lens: not compared
    s = induction_summary(rows, INDUCTION_THRESHOLD)
    assert s["induction_heads"] == ["L0H0", "L1H0", "L1H1", "L2H0"] and s["n_induction_heads"] == 4
    assert s["n_with_trained_lens"] == 3 and s["n_heads_at_threshold"] == {"0.1": 5, "0.2": 5, "0.3": 4, "0.5": 3}
    counts = lambda k: tuple(s[f"n_trained_{c}_logit_top{k}"] for c in ("ge", "gt", "both_zero"))  # noqa: E731
    assert counts(1) == (3, 1, 1) and counts(5) == (2, 2, 0)
    assert s["best_copier"]["trained"] == {"head": "L0H1", "rate": 0.9, "copy_top1_logit": 0.9,
                                           "copy_top1_trained": 0.9, "copy_top1_effect": None,
                                           "induction_score": 0.2999}
    assert "effect" not in s["best_copier"] and s["n_with_effect"] == 0
    assert s["best_copier"]["logit"]["head"] == "L0H1"
    assert summary_line(s) == ("4 induction heads (score >= 0.3); trained lens >= logit lens at top-1 on 3 of 3 "
                               "(both zero: 1), at top-5 on 2 of 3; best copier L0H1: trained 0.900, logit 0.900")
    assert induction_summary(rows, 0.2999)["n_induction_heads"] == 5


def test_summary_line_without_trained_lens_or_induction_heads():
    rows = [head_row(0, 0, 0.1, (0.2, 0.5), None), head_row(0, 1, 0.4, (0.25, 0.5), None)]
    s = induction_summary(rows)
    assert set(s["best_copier"]) == {"logit"} and s["n_with_trained_lens"] == 0
    assert summary_line(s) == "1 induction head (score >= 0.3); none has a trained lens; best copier L0H1: logit 0.250"
    rows = [head_row(0, 0, 0.1, (0.5, 0.5), (0.1, 0.2)), head_row(0, 1, 0.0, (0.1, 0.2), (0.3, 0.3))]
    assert summary_line(induction_summary(rows)) == (
        "0 induction heads (score >= 0.3); best copier through the trained lens L0H1: trained 0.300, logit 0.100; "
        "best copier through the logit lens L0H0: trained 0.100, logit 0.500")


def test_summary_counts_the_effect_against_the_logit_lens():
    rows = [head_row(0, 0, 0.9, (0.0, 0.0), (0.0, 0.0), (0.3, 0.5)),  # the logit lens sees nothing, its effect does
            head_row(0, 1, 0.5, (0.2, 0.4), (0.1, 0.3), (0.1, 0.4)),  # effect below at top-1, tied at top-5
            head_row(1, 0, 0.0, (0.25, 0.3), (0.2, 0.3), (0.6, 0.7))]  # not an induction head, best effect
    s = induction_summary(rows)
    assert s["n_with_effect"] == 2 and s["n_with_trained_lens"] == 2
    assert [s[f"n_effect_{c}_logit_top1"] for c in ("ge", "gt", "both_zero")] == [1, 1, 0]
    assert [s[f"n_effect_{c}_logit_top5"] for c in ("ge", "gt", "both_zero")] == [2, 1, 0]
    assert {read: b["head"] for read, b in s["best_copier"].items()} == {"logit": "L1H0", "trained": "L1H0",
                                                                         "effect": "L1H0"}
    assert summary_line(s) == (
        "2 induction heads (score >= 0.3); trained lens >= logit lens at top-1 on 1 of 2 (both zero: 1), at top-5 "
        "on 1 of 2; effect >= logit lens at top-1 on 1 of 2 (both zero: 0), at top-5 on 2 of 2; best copier L1H0: "
        "trained 0.200, logit 0.250, effect 0.600")
    rows[2]["copy_top1_effect"] = 0.1
    assert summary_line(induction_summary(rows)).endswith(
        "best copier through the trained lens and logit lens L1H0: trained 0.200, logit 0.250, effect 0.100; "
        "best copier through the effect L0H0: trained 0.000, logit 0.000, effect 0.300")
