"""Tests for loralens.lens.lenses.lens_set: forms, init, joint path, training."""


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from loralens.lens.lenses.lens_set import (
    FORMS,
    FoldedUnembed,
    LensBank,
    LensConfig,
    fingerprint_tensor,
    trainable_per_head,
)
from loralens.lens.lenses.losses import kl_exact

D, V, H, R = 16, 50, 3, 4


@pytest.fixture
def unembed() -> FoldedUnembed:
    g = torch.Generator().manual_seed(0)
    return FoldedUnembed(torch.randn(V, D, generator=g), torch.randn(V, generator=g))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(11, H, D, generator=torch.Generator().manual_seed(1))


def _randomise(bank: LensBank) -> LensBank:
    """Give every parameter non-trivial values so identity-init can't hide bugs."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return bank


def test_fingerprint_stable_and_sensitive(unembed):
    fp = unembed.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert FoldedUnembed(unembed.W.clone()).fingerprint() == fp
    W2 = unembed.W.clone()
    W2[3, 4] += 1e-3
    assert FoldedUnembed(W2).fingerprint() != fp
    # bf16 -> fp32 is exact, so bf16-representable weights hash identically.
    Wb = unembed.W.to(torch.bfloat16)
    assert fingerprint_tensor(Wb) == fingerprint_tensor(Wb.float())


def test_unembed_is_frozen_and_not_saved(unembed):
    bank = LensBank(unembed, H, LensConfig(form="lora", rank=R))
    assert not unembed.W.requires_grad and not unembed.b.requires_grad
    assert all(not k.startswith("unembed") for k in bank.state_dict())
    assert set(bank.state_dict()) == {"bias", "lora_A", "lora_B"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"form": "dense"}, "form"),
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": -1.0}, "alpha"),
        ({"dtype": "int8"}, "dtype"),
        ({"objective": "both"}, "objective"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} ") as e:
        LensConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_config_scale():
    assert LensConfig(rank=8, alpha=16).scale == 2.0


@pytest.mark.parametrize("form", ["lora", "residual"])
def test_untrained_equals_logit_lens_exactly(unembed, x, form):
    bank = LensBank(unembed, H, LensConfig(form=form, rank=R))
    lens = unembed.W @ x.unsqueeze(-1)  # [T, H, V, 1] via broadcasting over heads
    assert torch.equal(bank.head_logits(x), unembed(x))
    torch.testing.assert_close(bank.head_logits(x), lens.squeeze(-1))
    assert torch.equal(bank.layer_logits(x), unembed(x.sum(1)))


def test_untrained_full_equals_logit_lens(unembed, x):
    bank = LensBank(unembed, H, LensConfig(form="full"))
    torch.testing.assert_close(bank.head_logits(x), unembed(x))
    torch.testing.assert_close(bank.layer_logits(x), unembed(x.sum(1)))


def test_logit_lens_excludes_fold_bias_by_default(unembed, x):
    assert torch.equal(unembed(x[:, 0], with_bias=True), unembed(x[:, 0]) + unembed.b)
    assert not torch.allclose(unembed(x[:, 0], with_bias=True), unembed(x[:, 0]))


@pytest.mark.parametrize("form", FORMS)
def test_joint_equals_sum_of_heads(unembed, x, form):
    bank = _randomise(LensBank(unembed, H, LensConfig(form=form, rank=R)))
    heads = bank.head_logits(x)
    assert heads.shape == (x.shape[0], H, V)
    assert not torch.allclose(heads, unembed(x), atol=1e-2)  # really trained-like
    torch.testing.assert_close(bank.layer_logits(x), heads.sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["lora", "residual"])
def test_head_logits_match_formula(unembed, x, form):
    bank = _randomise(LensBank(unembed, H, LensConfig(form=form, rank=R, alpha=8)))
    s, W, h = 2.0, unembed.W, 1
    xh = x[:, h]
    if form == "lora":
        ref = xh @ W.T + s * xh @ bank.lora_A[h].T @ bank.lora_B[h].T + bank.bias[h]
    else:
        ref = (xh + s * xh @ bank.res_V[h].T @ bank.res_U[h].T) @ W.T + bank.bias[h]
    torch.testing.assert_close(bank.head_logits(x)[:, h], ref, rtol=1e-5, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("form", ["lora", "residual"])
def test_joint_path_never_builds_tokens_heads_vocab(unembed, x, form):
    bank = _randomise(LensBank(unembed, H, LensConfig(form=form, rank=R)))
    per_head = x.shape[0] * H * V
    with _LargestTensor() as spy:
        kl_exact(torch.randn(x.shape[0], V), bank.layer_logits(x)).backward()
    assert spy.largest < per_head
    with _LargestTensor() as spy:  # the spy does see the per-head path's tensor
        bank.head_logits(x)
    assert spy.largest >= per_head


def test_forward_dispatches_on_objective(unembed, x):
    joint = _randomise(LensBank(unembed, H, LensConfig(objective="joint", rank=R)))
    per = LensBank(unembed, H, LensConfig(objective="per_head", rank=R))
    per.load_state_dict(joint.state_dict())
    assert joint(x).shape == (x.shape[0], V)
    assert per(x).shape == (x.shape[0], H, V)
    torch.testing.assert_close(per(x).sum(1), joint(x), rtol=1e-5, atol=1e-5)


def test_lora_init(unembed):
    bank = LensBank(unembed, H, LensConfig(form="lora", rank=R))
    assert bank.lora_A.shape == (H, R, D) and bank.lora_B.shape == (H, V, R)
    assert torch.count_nonzero(bank.lora_B) == 0 and torch.count_nonzero(bank.bias) == 0
    assert bank.lora_A.abs().max() <= D**-0.5 and bank.lora_A.std() > 0.05
    assert not torch.equal(bank.lora_A[0], bank.lora_A[1])  # heads break symmetry


def test_residual_init(unembed):
    bank = LensBank(unembed, H, LensConfig(form="residual", rank=R))
    assert bank.res_U.shape == (H, D, R) and bank.res_V.shape == (H, R, D)
    assert torch.count_nonzero(bank.res_U) == 0 and bank.res_V.std() > 0.05


@pytest.mark.parametrize("form, per_head", [("full", 850), ("lora", 314), ("residual", 178)])
def test_trainable_parameters(unembed, form, per_head):
    bank = LensBank(unembed, H, LensConfig(form=form, rank=R))
    assert trainable_per_head(form, R, D, V) == per_head
    assert bank.trainable_parameters() == H * per_head


def test_bad_input_shape_raises(unembed):
    bank = LensBank(unembed, H, LensConfig(rank=R))
    with pytest.raises(ValueError, match="x must be"):
        bank.layer_logits(torch.randn(4, H + 1, D))


@pytest.mark.parametrize("form", FORMS)
def test_bfloat16_params_compute_in_float32(unembed, x, form):
    """A bf16 bank computes its logits in fp32 from its bf16 weights: exactly an fp32 bank holding those values."""
    bank = _randomise(LensBank(unembed, H, LensConfig(form=form, rank=R, dtype="bfloat16")))
    assert {p.dtype for p in bank.parameters()} == {torch.bfloat16}
    ref = LensBank(unembed, H, LensConfig(form=form, rank=R))
    ref.load_state_dict({k: v.float() for k, v in bank.state_dict().items()})
    for got, want in ((bank.layer_logits(x), ref.layer_logits(x)), (bank.head_logits(x), ref.head_logits(x))):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def _toy_target(unembed: FoldedUnembed, x: torch.Tensor) -> torch.Tensor:
    """Target logits a lens can move towards but the logit lens does not match."""
    g = torch.Generator().manual_seed(5)
    return 2.0 * unembed(x.sum(1) @ torch.randn(D, D, generator=g) / D**0.5) + torch.randn(V, generator=g)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("objective", ["joint", "per_head"])
def test_loss_decreases_with_adam(unembed, x, form, objective):
    bank = LensBank(unembed, H, LensConfig(form=form, rank=R, objective=objective))
    W0 = unembed.W.clone()
    target = _toy_target(unembed, x)
    opt = torch.optim.Adam([p for p in bank.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(12):
        loss = kl_exact(target, lambda rows: bank(x[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(unembed.W, W0) and unembed.W.grad is None
