"""Tests for loralens.lens.lenses.peft_io: bank save/load and PEFT adapter export."""

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from loralens.lens.lenses.lens_set import FoldedUnembed, LensBank, LensConfig
from loralens.lens.lenses.peft_io import (
    UnembedLens,
    export_head_adapter,
    load_bank,
    read_bank_config,
    save_bank,
)

D, V, H, R = 16, 50, 3, 4


@pytest.fixture
def unembed() -> FoldedUnembed:
    g = torch.Generator().manual_seed(0)
    return FoldedUnembed(torch.randn(V, D, generator=g), torch.randn(V, generator=g))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(9, H, D, generator=torch.Generator().manual_seed(1))


def _trained(unembed: FoldedUnembed, form: str, alpha: float = 16.0) -> LensBank:
    """A bank with non-trivial parameters (as if trained)."""
    bank = LensBank(unembed, H, LensConfig(form=form, rank=R, alpha=alpha), layer=5)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return bank


@pytest.mark.parametrize("form", ["full", "lora", "residual"])
def test_save_load_roundtrip(tmp_path, unembed, x, form):
    bank = _trained(unembed, form)
    save_bank(bank, tmp_path)
    cfg = read_bank_config(tmp_path)
    assert cfg["form"] == form and cfg["rank"] == R and cfg["alpha"] == 16.0
    assert (cfg["n_heads"], cfg["d_model"], cfg["vocab"], cfg["layer"]) == (H, D, V, 5)
    assert cfg["fingerprint"] == unembed.fingerprint()
    loaded = load_bank(tmp_path, unembed)
    assert loaded.layer == 5 and loaded.config == bank.config
    assert torch.equal(loaded.head_logits(x), bank.head_logits(x))
    assert not any(k.startswith("unembed") for k in load_file(tmp_path / "lens_bank.safetensors"))


def test_load_rejects_other_model(tmp_path, unembed):
    save_bank(_trained(unembed, "lora"), tmp_path)
    other = FoldedUnembed(unembed.W + 1e-3)
    with pytest.raises(ValueError, match=r"^fingerprint mismatch") as e:
        load_bank(tmp_path, other)
    assert "\n" not in str(e.value)


def test_load_rejects_shape_mismatch(tmp_path, unembed):
    save_bank(_trained(unembed, "lora"), tmp_path)
    with pytest.raises(ValueError, match=r"^vocab mismatch: bank has 50, unembed has 49"):
        load_bank(tmp_path, FoldedUnembed(unembed.W[:-1]))
    with pytest.raises(ValueError, match=r"^d_model mismatch"):
        load_bank(tmp_path, FoldedUnembed(unembed.W[:, :-1]))


def test_load_rejects_tampered_tensor_shape(tmp_path, unembed):
    save_bank(_trained(unembed, "lora"), tmp_path)
    cfg = read_bank_config(tmp_path)
    cfg["rank"] = R + 1
    (tmp_path / "lens_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^shape mismatch for lora_"):
        load_bank(tmp_path, unembed)


@pytest.mark.parametrize("form", ["lora", "residual"])
def test_export_head_reproduced_by_peft(tmp_path, unembed, x, form):
    bank = _trained(unembed, form, alpha=6.0)
    head = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no (false-alarm) peft warnings leak out
        export_head_adapter(bank, head, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == R and cfg["lora_alpha"] == 6.0 and cfg["target_modules"] == ["lens"]
    assert cfg["lora_bias"] is True and cfg["bias"] == "none"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.lens.lora_A.weight": (R, D),
        "base_model.model.lens.lora_B.weight": (V, R),
        "base_model.model.lens.lora_B.bias": (V,),
    }
    model = PeftModel.from_pretrained(UnembedLens(unembed), tmp_path)
    with torch.no_grad():
        got = model(x[:, head])
    want = bank.head_logits(x)[:, head].detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unembed(x[:, head]), atol=1e-2)  # adapter really applied
    with model.disable_adapter(), torch.no_grad():  # base alone == logit lens
        torch.testing.assert_close(model(x[:, head]), unembed(x[:, head]))


def test_several_heads_share_one_base(tmp_path, unembed, x):
    bank = _trained(unembed, "lora")
    for h in (0, 2):
        export_head_adapter(bank, h, tmp_path / f"head{h}")
    model = PeftModel.from_pretrained(UnembedLens(unembed), tmp_path / "head0", adapter_name="h0")
    model.load_adapter(tmp_path / "head2", adapter_name="h2")
    want = bank.head_logits(x).detach()
    for name, h in (("h0", 0), ("h2", 2)):
        model.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(model(x[:, h]), want[:, h], rtol=1e-5, atol=1e-5)


def test_export_merge_folds_into_plain_linear(tmp_path, unembed, x):
    bank = _trained(unembed, "lora")
    export_head_adapter(bank, 0, tmp_path)
    merged = PeftModel.from_pretrained(UnembedLens(unembed), tmp_path).merge_and_unload()
    assert isinstance(merged.lens, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(merged(x[:, 0]), bank.head_logits(x)[:, 0], rtol=1e-5, atol=1e-5)


def test_export_full_form_raises(tmp_path, unembed):
    with pytest.raises(ValueError, match="form 'full'"):
        export_head_adapter(_trained(unembed, "full"), 0, tmp_path)


def test_export_bad_head_raises(tmp_path, unembed):
    with pytest.raises(ValueError, match="head must be in"):
        export_head_adapter(_trained(unembed, "lora"), H, tmp_path)


def test_lora_config_scaling_matches_bank():
    # Guards the bias / scaling convention export relies on.
    assert LoraConfig(r=R, lora_alpha=6.0).lora_alpha / R == LensConfig(rank=R, alpha=6.0).scale
