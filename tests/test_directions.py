"""Per-head toxic directions (contrast, unembed, lens), the per-head probe, and steering along them, on hand-made
tensors and on the tiny llama whose planted head (tests/test_attribution.py) writes the toxic token's unembedding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import train_bpe_tokenizer
from test_attribution import PLANTED, TOXIC_WORD, planted_corpus, planted_model

from loralens.lens.evaluation.probes import probe_auroc
from loralens.lens.heads import directions as D
from loralens.lens.heads.edits import HeadIntervention, intervene
from loralens.lens.heads.head_scores import toxic_direction
from loralens.lens.heads.hooks import capture, split_heads
from loralens.lens.lenses.lens_set import lens_inputs
from loralens.lens.runtime.adapters import adapter_for, folded_unembedding, model_dims, norm_scale, out_proj_weight


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(D.unit(a) @ D.unit(b))


# -- pure functions ----------------------------------------------------------------------------------------
def test_contrast_direction_is_the_difference_of_group_means():
    z_toxic = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # [n=2, H=1, dh=2]: mean (2, 3)
    z_clean = torch.tensor([[[0.0, 1.0]], [[0.0, 3.0]], [[0.0, 2.0]]])  # mean (0, 2)
    assert D.contrast_direction(z_toxic, z_clean).tolist() == [[2.0, 1.0]]
    with pytest.raises(ValueError, match="both groups"):
        D.contrast_direction(z_toxic[:0], z_clean)


def test_unembed_direction_reads_the_residual_write_along_u():
    g = torch.Generator().manual_seed(0)
    w_o, u, z = torch.randn(3, 4, 6, generator=g), torch.randn(6, generator=g), torch.randn(3, 4, generator=g)
    d = D.unembed_direction(w_o, u)  # [H=3, dh=4]
    writes = torch.einsum("hk,hkd->hd", z, w_o)  # c_h = z_h W_O[h]
    torch.testing.assert_close((z * d).sum(-1), writes @ u)


def linear_lens_case(seed: int, n: int, H: int, dh: int, d: int, V: int):
    """Return (w [V, d], w_o [H, dh, d], scale [n], tox [V], x [n, H, d]) of random z written through W_O."""
    g = torch.Generator().manual_seed(seed)
    w, w_o = torch.randn(V, d, generator=g), torch.randn(H, dh, d, generator=g)
    z, scale, tox = torch.randn(n, H, dh, generator=g), torch.rand(n, generator=g) + 0.5, torch.rand(V, generator=g)
    return w, w_o, scale, tox, torch.einsum("nhk,hkd->nhd", z, w_o) / scale[:, None, None]


def test_lens_direction_of_a_linear_lens_is_the_analytic_gradient():
    """For logits = x W^T: dJ/dx = W^T (p * (t - J)), and dJ/dz_h = W_O[h] dJ/dx / scale (mean over positions)."""
    n = 5
    w, w_o, scale, tox, x = linear_lens_case(1, n, 2, 3, 4, 7)
    got = D.lens_direction(lambda x_: x_ @ w.T, x, w_o, scale, tox)
    p = torch.softmax(x @ w.T, -1)
    j = p @ tox
    grad_x = (p * (tox - j[..., None])) @ w  # [n, H, d]
    want = torch.einsum("nhd,hkd->hk", grad_x / scale[:, None, None], w_o) / n
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_lens_direction_chunks_bound_their_blocks_and_chunking_leaves_the_mean_unchanged():
    """A chunk of positions holds LENS_BLOCKS fp32 [chunk, H, V] blocks: SmolLM2 (9 heads, 49,152 tokens) keeps 32
    positions; Llama-3-8B (32 heads, 128,256 tokens) takes fewer, within the budget; the weighted mean of chunk
    means is the mean over all positions."""
    assert D.lens_direction_chunk(9, 49152) == D.MAX_LENS_CHUNK
    big = D.lens_direction_chunk(32, 128256)
    assert 1 <= big < D.MAX_LENS_CHUNK and D.LENS_BLOCKS * big * 32 * 128256 * 4 <= D.LENS_BLOCK_BYTES
    assert D.lens_direction_chunk(64, 10**7) == 1  # never zero
    n = 7
    w, w_o, scale, tox, x = linear_lens_case(2, n, 2, 3, 4, 5)
    whole = D.lens_direction(lambda x_: x_ @ w.T, x, w_o, scale, tox)
    parts = sum(D.lens_direction(lambda x_: x_ @ w.T, x[i:i + 3], w_o, scale[i:i + 3], tox) * len(x[i:i + 3])
                for i in range(0, n, 3)) / n
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-5)


def test_projection_sigma_and_probe_find_the_one_informative_head():
    g = torch.Generator().manual_seed(2)
    n, H, dh = 400, 3, 4
    y = torch.arange(n) % 2
    z = torch.randn(n, H, dh, generator=g)
    z[:, 1, 2] += 3.0 * y  # only head 1 carries the label, along its third coordinate
    d_hat = D.unit(torch.eye(dh)[2].expand(H, dh))
    sigma = D.projection_sigma(z, d_hat)
    assert sigma[1] > sigma[0] and sigma[1] > sigma[2]
    auroc = probe_auroc(z[:300], y[:300], z[300:], y[300:])
    assert auroc.argmax() == 1 and auroc[1] > 0.95 and max(auroc[0], auroc[2]) < 0.75


# -- the planted toxic head ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted tiny llama, its tokenizer, and its z at the planted layer on toxic and clean prompts."""
    from transformers import AutoModelForCausalLM

    from loralens.warehouse.corpus import bundled_path

    root = tmp_path_factory.mktemp("directions")
    lines = bundled_path("wikitext2_test").read_text(encoding="utf-8").splitlines()[:1500]
    tokenizer = train_bpe_tokenizer(lines + [f"you{TOXIC_WORD}, you are an{TOXIC_WORD}"] * 300, vocab_size=400)
    model = AutoModelForCausalLM.from_pretrained(planted_model(root / "model", tokenizer)).eval()
    groups = {}
    for path in planted_corpus(root):
        texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]
        groups[Path(path).stem] = tokenizer(texts, return_tensors="pt", padding=True)
    return model, tokenizer, groups


def last_z(model, adapter, enc, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return z `[batch, heads*d_head]` at each prompt's last real token, and the final residual there."""
    with torch.no_grad(), capture(model, adapter, [layer]) as cap:
        model(**enc)
    last = enc["attention_mask"].sum(1) - 1
    rows = torch.arange(len(last))
    return cap.z[layer][rows, last], cap.final_resid[rows, last]


def toxic_prob(model, tokenizer, enc) -> float:
    """Return the mean next-token probability of the toxic word at each prompt's last real token."""
    tox_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(TOXIC_WORD))[0]
    with torch.no_grad():
        logits = model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    return float(torch.softmax(logits[torch.arange(len(last)), last], -1)[:, tox_id].mean())


def test_each_direction_source_recovers_the_planted_direction(planted):
    model, tokenizer, groups = planted
    adapter, dims = adapter_for(model.config.model_type), model_dims(model.config)
    layer, head = PLANTED
    planted_dir = torch.eye(dims.d_head)[0]  # the planted head's value is the flag, in z coordinate 0
    z_tox, resid_tox = last_z(model, adapter, groups["toxic"], layer)
    z_clean, _ = last_z(model, adapter, groups["clean"], layer)
    zt, zc = split_heads(z_tox, dims.n_heads), split_heads(z_clean, dims.n_heads)
    assert cosine(D.contrast_direction(zt, zc)[head], planted_dir) >= 0.9

    tox = torch.zeros(model.config.vocab_size)
    tox[tokenizer.convert_tokens_to_ids(tokenizer.tokenize(TOXIC_WORD))[0]] = 1.0
    w_fold, _ = folded_unembedding(adapter, model)
    w_o = out_proj_weight(adapter, model, layer, dims).detach()
    assert cosine(D.unembed_direction(w_o, toxic_direction(w_fold, tox))[head], planted_dir) >= 0.9

    scale = norm_scale(adapter, model, resid_tox)[:, 0]
    x = lens_inputs(z_tox, scale, w_o)  # [n, H, d]
    d_lens = D.lens_direction(lambda x_: x_ @ w_fold.T, x, w_o, scale, tox)  # through the logit lens
    assert cosine(d_lens[head], planted_dir) >= 0.9


def test_steering_the_planted_head_lowers_the_toxic_word_and_a_random_head_does_not(planted):
    model, tokenizer, groups = planted
    adapter, dims = adapter_for(model.config.model_type), model_dims(model.config)
    layer, head = PLANTED
    enc = groups["toxic"]
    z_tox, _ = last_z(model, adapter, enc, layer)
    z_clean, _ = last_z(model, adapter, groups["clean"], layer)
    zt, zc = split_heads(z_tox, dims.n_heads), split_heads(z_clean, dims.n_heads)
    d = D.contrast_direction(zt, zc)  # [H, dh]
    sigma = D.projection_sigma(torch.cat([zt, zc]), D.unit(d))
    base = toxic_prob(model, tokenizer, enc)
    assert base > 0.5
    target = (layer, head)
    for kind, factor in (("steer", 2.0), ("reverse", 1.0)):
        iv = HeadIntervention(kind, [target], factor=factor, z_directions={target: d[head]},
                              sigmas={target: float(sigma[head])})
        with intervene(model, adapter, iv):
            assert toxic_prob(model, tokenizer, enc) < 0.5 * base, kind
    other = (0, 1)  # a head of another layer, steered the same way along a random direction of its own
    rand = torch.randn(dims.d_head, generator=torch.Generator().manual_seed(0))
    with intervene(model, adapter, HeadIntervention("steer", [other], factor=2.0, z_directions={other: rand})):
        assert toxic_prob(model, tokenizer, enc) > 0.8 * base


def test_contrast_from_teacher_forced_continuations_recovers_the_planted_direction(planted):
    """The `contrast` source as the select stage computes it: mean z over the positions that write a human
    continuation, labelled by whether the continuation is toxic."""
    from loralens.lens.heads.causal_scores import teacher_forced_batches

    model, tokenizer, _groups = planted
    adapter, dims = adapter_for(model.config.model_type), model_dims(model.config)
    layer, head = PLANTED
    words = "a dog ran past the tall tree by one small red barn".split()
    prompts = [" ".join(words[i:i + 4]) for i in range(8)]
    continuations = [f" {words[i]}{TOXIC_WORD} {words[i + 1]}" if i % 2 else f" {words[i]} {words[i + 1]}"
                     for i in range(8)]
    batches = teacher_forced_batches(tokenizer, prompts, continuations, batch_size=3)
    acts = D.scored_activations(model, adapter, batches, [0, layer], dims.n_heads)
    n_pos = int(sum(b.scored.sum() for b in batches))
    assert acts.n_seq == 8 and acts.scale.shape == (n_pos,)
    assert acts.z[layer].shape == (n_pos, dims.n_heads, dims.d_head)
    means = acts.means(layer)  # [8, H, dh]
    first = acts.row == 0
    torch.testing.assert_close(means[0], acts.z[layer][first].mean(0))
    toxic = torch.tensor([i % 2 == 1 for i in range(8)])
    d = D.contrast_direction(means[toxic], means[~toxic])  # [H, dh]
    assert cosine(d[head], torch.eye(dims.d_head)[0]) >= 0.9
