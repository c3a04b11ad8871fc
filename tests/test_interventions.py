"""Head interventions (zero, mean, scale, project, steer, reverse) on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch

from loralens.lens.heads.edits import HeadIntervention, intervene, mean_head_z
from loralens.lens.heads.head_sets import format_heads, parse_head_list, random_head_sets
from loralens.lens.heads.hooks import capture, head_contributions, split_heads
from loralens.lens.runtime.adapters import adapter_for, model_dims, out_proj_weight
from tests.conftest import FAMILIES

PROMPTS = ["The quick brown fox jumps over", "A short one", "Robert is an English film actor and he"]
MORE_PROMPTS = ["It was a dark and stormy night", "Hello there"]


@pytest.fixture(scope="module")
def load(tiny_models):
    """Return family -> (model, adapter, dims), each tiny model loaded once per module."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(family: str):
        if family not in cache:
            model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
            cache[family] = (model, adapter_for(model.config.model_type), model_dims(model.config))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def enc(tiny_tokenizer):
    return tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True)


def logits_of(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits


def attn_capture(model, adapter, enc, layer: int):
    """Return (z, attn_out) at `layer`; entered inside `intervene`, z is the edited one."""
    with torch.no_grad(), capture(model, adapter, [layer], attn_out=True, final_resid=False) as cap:
        model(**enc)
    return cap.z[layer], cap.attn_out[layer]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_heads_is_bit_identical(family, load, enc):
    model, adapter, _ = load(family)
    plain = logits_of(model, enc)
    for ivs in ([], HeadIntervention("zero", ()), [HeadIntervention("scale", (), factor=3.0)]):
        with intervene(model, adapter, ivs):
            assert not adapter.out_proj(model, 0)._forward_pre_hooks
            assert torch.equal(logits_of(model, enc), plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_subtracts_the_head_contribution(family, load, enc):
    model, adapter, dims = load(family)
    layer, head = 1, 2
    z, attn_out = attn_capture(model, adapter, enc, layer)
    w_o = out_proj_weight(adapter, model, layer, dims).detach()
    expected = attn_out - head_contributions(z, w_o)[..., head, :]
    with intervene(model, adapter, HeadIntervention("zero", ((layer, head),))):
        z_zeroed, attn_zeroed = attn_capture(model, adapter, enc, layer)
        ablated = logits_of(model, enc)
    assert split_heads(z_zeroed, dims.n_heads)[..., head, :].abs().max() == 0
    torch.testing.assert_close(attn_zeroed, expected, atol=1e-5, rtol=1e-5)
    assert (ablated - logits_of(model, enc)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_scale_one_is_identity_and_scale_zero_is_zero(family, load, enc):
    model, adapter, _ = load(family)
    heads = ((0, 1), (2, 3))
    plain = logits_of(model, enc)
    with intervene(model, adapter, HeadIntervention("scale", heads, factor=1.0)):
        torch.testing.assert_close(logits_of(model, enc), plain, atol=0, rtol=0)
    with intervene(model, adapter, HeadIntervention("scale", heads, factor=0.0)):
        scaled = logits_of(model, enc)
    with intervene(model, adapter, HeadIntervention("zero", heads)):
        zeroed = logits_of(model, enc)
    torch.testing.assert_close(scaled, zeroed, atol=1e-6, rtol=1e-6)
    assert (zeroed - plain).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox"])
def test_mean_head_z_averages_real_tokens_and_mean_ablation_uses_it(family, load, enc, tiny_tokenizer):
    model, adapter, dims = load(family)
    batches = [enc, tiny_tokenizer(MORE_PROMPTS, return_tensors="pt", padding=True)]
    means = mean_head_z(model, adapter, dims, batches, layers=[2])
    assert set(means) == {(2, h) for h in range(dims.n_heads)}
    assert all(m.shape == (dims.d_head,) and m.dtype == torch.float32 for m in means.values())
    # reference: masked mean of the captured z, pads excluded
    zs = []
    for b in batches:
        z, _ = attn_capture(model, adapter, b, 2)
        zs.append(z[b["attention_mask"].bool()])
    ref = split_heads(torch.cat(zs).mean(0), dims.n_heads)  # [heads, d_head]
    torch.testing.assert_close(torch.stack([means[(2, h)] for h in range(dims.n_heads)]), ref, atol=1e-6, rtol=1e-5)

    with intervene(model, adapter, HeadIntervention("mean", ((2, 1),), means=means)):
        z_mean, _ = attn_capture(model, adapter, enc, 2)
    zh = split_heads(z_mean, dims.n_heads)
    assert torch.equal(zh[..., 1, :], means[(2, 1)].expand_as(zh[..., 1, :]))
    z_plain, _ = attn_capture(model, adapter, enc, 2)
    assert torch.equal(zh[..., 0, :], split_heads(z_plain, dims.n_heads)[..., 0, :])  # other heads untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_project_removes_the_write_along_u_and_is_idempotent(family, load, enc):
    model, adapter, dims = load(family)
    layer, heads = 1, ((1, 0), (1, 3))
    u = torch.randn(dims.d_model, generator=torch.Generator().manual_seed(0))
    w_o = out_proj_weight(adapter, model, layer, dims).detach()
    z_plain, _ = attn_capture(model, adapter, enc, layer)
    before = head_contributions(z_plain, w_o) @ u  # [batch, pos, heads]
    iv = HeadIntervention("project", heads, direction=u * 5.0)  # the direction's scale is irrelevant
    with intervene(model, adapter, iv):
        z_proj, _ = attn_capture(model, adapter, enc, layer)
        once = logits_of(model, enc)
    after = head_contributions(z_proj, w_o) @ u
    for _, h in heads:
        assert before[..., h].abs().max() > 1e-2
        assert after[..., h].abs().max() < 1e-5 * before[..., h].abs().max() + 1e-6
    torch.testing.assert_close(after[..., 1], before[..., 1], atol=0, rtol=0)  # unchosen head untouched
    with intervene(model, adapter, [iv, iv]):
        twice = logits_of(model, enc)
    torch.testing.assert_close(twice, once, atol=1e-5, rtol=1e-5)
    # per-head directions give the same result as the shared one
    with intervene(model, adapter, HeadIntervention("project", heads, direction={h: u * 5.0 for h in heads})):
        torch.testing.assert_close(logits_of(model, enc), once, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_steer_shifts_z_by_a_constant_along_the_direction(family, load, enc):
    model, adapter, dims = load(family)
    layer, heads = 1, ((1, 0), (1, 3))
    g = torch.Generator().manual_seed(1)
    d = {h: torch.randn(dims.d_head, generator=g) * 3.0 for h in heads}  # normalized by the edit
    sigmas = {(1, 0): 0.5, (1, 3): 2.0}
    z_plain, _ = attn_capture(model, adapter, enc, layer)
    with intervene(model, adapter, HeadIntervention("steer", heads, factor=1.5, z_directions=d, sigmas=sigmas)):
        z_steer, _ = attn_capture(model, adapter, enc, layer)
    zp, zs = split_heads(z_plain, dims.n_heads), split_heads(z_steer, dims.n_heads)
    for head in heads:
        d_hat = d[head] / d[head].norm()
        torch.testing.assert_close(zp[..., head[1], :] - zs[..., head[1], :],
                                   (1.5 * sigmas[head] * d_hat).expand_as(zp[..., head[1], :]), atol=1e-5, rtol=0)
    torch.testing.assert_close(zs[..., 1, :], zp[..., 1, :], atol=0, rtol=0)  # unchosen head untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_reverse_removes_only_the_positive_part(family, load, enc):
    model, adapter, dims = load(family)
    layer, head = 1, (1, 2)
    z_plain, _ = attn_capture(model, adapter, enc, layer)
    zp = split_heads(z_plain, dims.n_heads)[..., 2, :]  # [batch, pos, d_head]
    flat = zp.reshape(-1, dims.d_head)
    d = flat[0] / flat[0].norm() - flat[-1] / flat[-1].norm()  # positive at the first position, negative at the last
    d_hat = d / d.norm()
    proj = zp @ d_hat
    assert (proj > 1e-4).any() and (proj < -1e-4).any()
    for factor in (1.0, 2.0):
        with intervene(model, adapter, HeadIntervention("reverse", [head], factor=factor, z_directions={head: d})):
            z_rev, _ = attn_capture(model, adapter, enc, layer)
        zr = split_heads(z_rev, dims.n_heads)[..., 2, :]
        neg = proj <= 0
        torch.testing.assert_close(zr[neg], zp[neg], atol=0, rtol=0)  # negative projection: z unchanged
        torch.testing.assert_close(zr[~neg] @ d_hat, (1 - factor) * proj[~neg], atol=1e-5, rtol=1e-5)
        rest = zr[~neg] - (zr[~neg] @ d_hat)[:, None] * d_hat
        torch.testing.assert_close(rest, zp[~neg] - proj[~neg][:, None] * d_hat, atol=1e-5, rtol=1e-5)


def test_steer_and_reverse_validation_names_the_field(load):
    model, adapter, dims = load("llama")
    with pytest.raises(ValueError, match="^z_directions: missing for head L1H0"):
        with intervene(model, adapter, HeadIntervention("steer", [(1, 0)], factor=1.0)):
            pass
    with pytest.raises(ValueError, match="^z_directions: head L1H0 has shape"):
        with intervene(model, adapter, HeadIntervention("reverse", [(1, 0)], z_directions={(1, 0): torch.ones(3)})):
            pass
    with pytest.raises(ValueError, match="^z_directions: head L1H0 must be finite and non-zero"):
        with intervene(model, adapter, HeadIntervention("steer", [(1, 0)],
                                                        z_directions={(1, 0): torch.zeros(dims.d_head)})):
            pass


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_interventions_compose_in_order(family, load, enc):
    model, adapter, dims = load(family)
    with intervene(model, adapter, HeadIntervention("zero", ((1, 0), (1, 2)))):
        both = logits_of(model, enc)
    with intervene(model, adapter, [HeadIntervention("zero", ((1, 0),)), HeadIntervention("zero", ((1, 2),))]):
        assert torch.equal(logits_of(model, enc), both)
    with intervene(model, adapter, HeadIntervention("zero", ((1, 0),))):
        with intervene(model, adapter, HeadIntervention("zero", ((1, 2),))):
            assert torch.equal(logits_of(model, enc), both)
    # same head, two kinds: the later one sees z as edited by the earlier one (mean 1, then halved)
    means = {(1, 0): torch.ones(dims.d_head)}
    with intervene(model, adapter, [HeadIntervention("mean", ((1, 0),), means=means),
                                    HeadIntervention("scale", ((1, 0),), factor=0.5)]):
        z, _ = attn_capture(model, adapter, enc, 1)
    z0 = split_heads(z, dims.n_heads)[..., 0, :]
    assert torch.equal(z0, torch.full_like(z0, 0.5))


def test_hooks_removed_on_exit_and_on_exception(load, enc):
    model, adapter, _ = load("gpt2")
    plain = logits_of(model, enc)
    proj = adapter.out_proj(model, 1)
    iv = HeadIntervention("zero", ((1, 0), (2, 1)))
    with intervene(model, adapter, iv):
        assert proj._forward_pre_hooks
    assert not proj._forward_pre_hooks
    assert torch.equal(logits_of(model, enc), plain)
    with pytest.raises(RuntimeError, match="boom"), intervene(model, adapter, iv):
        raise RuntimeError("boom")
    assert all(not adapter.out_proj(model, layer)._forward_pre_hooks for layer in range(3))
    assert torch.equal(logits_of(model, enc), plain)


def test_validation_names_the_field(load):
    model, adapter, dims = load("qwen3")
    u = torch.ones(dims.d_model)
    bad = [
        (lambda: HeadIntervention("zero", ((3, 0),)), "heads: layer 3"),
        (lambda: HeadIntervention("zero", ((0, 4),)), "heads: head 4"),
        (lambda: HeadIntervention("zero", ((-1, 0),)), "heads: layer -1"),
        (lambda: HeadIntervention("zero", ((0, 1), (0, 1))), "heads: duplicate"),
        (lambda: HeadIntervention("drop", ((0, 0),)), "kind: unknown"),
        (lambda: HeadIntervention("scale", ((0, 0),), factor=float("nan")), "factor"),
        (lambda: HeadIntervention("scale", ((0, 0),), factor=float("inf")), "factor"),
        (lambda: HeadIntervention("mean", ((0, 0),)), "means: missing"),
        (lambda: HeadIntervention("mean", ((0, 0),), means={(0, 1): torch.zeros(dims.d_head)}), "means: missing"),
        (lambda: HeadIntervention("mean", ((0, 0),), means={(0, 0): torch.zeros(dims.d_model)}), "means: head"),
        (lambda: HeadIntervention("project", ((0, 0),)), "direction: required"),
        (lambda: HeadIntervention("project", ((0, 0),), direction=0 * u), "direction: must be non-zero"),
        (lambda: HeadIntervention("project", ((0, 0),), direction=torch.ones(dims.d_head)), "direction: shape"),
        (lambda: HeadIntervention("project", ((0, 0),), direction={(0, 1): u}), "direction: missing"),
    ]
    for make, message in bad:
        with pytest.raises(ValueError, match=message):
            with intervene(model, adapter, [HeadIntervention("zero", ((0, 0),)), make()]):
                pass
        # validation happens before any hook is registered
        assert not adapter.out_proj(model, 0)._forward_pre_hooks


def test_random_head_sets():
    exclude = ((0, 0), (1, 2), (2, 3))
    sets = random_head_sets(3, 4, 3, seeds=[0, 1, 2, 3], exclude=exclude)
    assert sets == random_head_sets(3, 4, 3, seeds=[0, 1, 2, 3], exclude=exclude)
    assert sets[1] == random_head_sets(3, 4, 3, seeds=[1], exclude=exclude)[0]  # each set depends only on its seed
    assert len(set(sets)) > 1
    for s in sets:
        assert len(s) == len(set(s)) == 3 and list(s) == sorted(s)
        assert not set(s) & set(exclude)
        assert all(0 <= layer < 3 and 0 <= head < 4 for layer, head in s)
    assert random_head_sets(3, 4, 9, seeds=[5], exclude=exclude)[0] == tuple(
        (layer, head) for layer in range(3) for head in range(4) if (layer, head) not in exclude
    )
    with pytest.raises(ValueError, match="size"):
        random_head_sets(3, 4, 10, seeds=[0], exclude=exclude)


def test_parse_and_format_heads():
    heads = ((3, 1), (5, 0), (12, 7))
    assert format_heads(heads) == "L3H1,L5H0,L12H7"
    assert parse_head_list(format_heads(heads)) == heads
    assert parse_head_list("3.1, 5.0 12.7") == heads
    assert parse_head_list("L3H1 l5h0,L12H7") == heads
    assert parse_head_list("  ") == ()
    for bad in ("3.1, x", "L3", "3-1", "L3H1H2", "3.1.2"):
        with pytest.raises(ValueError, match="bad head"):
            parse_head_list(bad)
