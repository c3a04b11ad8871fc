"""Save/load lens banks, and export one head as a standard PEFT LoRA adapter.

Bank layout (one layer per directory)::

    out_dir/lens_config.json       form, rank, alpha, dtype, objective, n_heads,
                                   d_model, vocab, fingerprint, layer, format
    out_dir/lens_bank.safetensors  trainable tensors only (the shared W_fold is
                                   not saved; the fingerprint names it)

PEFT export, per head: the base is :class:`UnembedLens`, a wrapper whose
``lens = nn.Linear(d_model, vocab)`` holds ``weight = W_fold`` and a ZERO bias
(per-head logit lens excludes ``b_fold``, see ``lenses.py``). The base is the
same for every head, so any number of exported heads load onto one base. The
head's own bias travels inside the adapter as the ``lora_B`` bias
(``LoraConfig(lora_bias=True)``), stored as ``bias_h / scaling`` because peft
computes ``base(x) + scaling * lora_B(lora_A(x))``. We avoid ``bias="lora_only"``
(it saves and overwrites the *base* layer's bias, so heads would clobber each
other) and avoid baking the bias into the base (one base per head).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from loralens.lens.lenses.lens_set import FoldedUnembed, LensBank, LensConfig

CONFIG_NAME = "lens_config.json"
WEIGHTS_NAME = "lens_bank.safetensors"
FORMAT_VERSION = 1
TARGET_MODULE = "lens"
_BIAS_FALSE_ALARM = (
    r"Adapter 'default': 1 LoRA tensor\(s\) have invalid shape: "
    rf"base_model\.model\.{TARGET_MODULE}\.lora_B\.bias:\(\d+,\)\."
)


def bank_config(bank: LensBank) -> dict:
    """Return the JSON-serialisable description of a bank."""
    return {
        "format": FORMAT_VERSION,
        **bank.config.to_dict(),
        "n_heads": bank.n_heads,
        "d_model": bank.d_model,
        "vocab": bank.vocab,
        "fingerprint": bank.unembed.fingerprint(),
        "layer": bank.layer,
    }


def bank_tensors(bank: LensBank) -> dict[str, Tensor]:
    """Return the bank's trainable tensors on the host, as a safetensors file stores them (no shared base)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in bank.state_dict().items()}  # host: to a file


def save_bank(bank: LensBank, out_dir: str | Path) -> Path:
    """Write ``bank`` to ``out_dir`` (config JSON + safetensors) and return the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(bank_tensors(bank), str(out / WEIGHTS_NAME), metadata={"fingerprint": bank.unembed.fingerprint()})
    (out / CONFIG_NAME).write_text(json.dumps(bank_config(bank), indent=2) + "\n")
    return out


def read_bank_config(in_dir: str | Path) -> dict:
    """Return the saved config dict of the bank in ``in_dir``."""
    return json.loads((Path(in_dir) / CONFIG_NAME).read_text())


def check_compatible(cfg: dict, unembed: FoldedUnembed) -> None:
    """Raise a one-line ValueError if ``cfg`` was not saved for this ``unembed``."""
    for key, have in (("d_model", unembed.d_model), ("vocab", unembed.vocab)):
        if cfg.get(key) != have:
            raise ValueError(f"{key} mismatch: bank has {cfg.get(key)}, unembed has {have}")
    if cfg.get("fingerprint") != unembed.fingerprint():
        raise ValueError(f"fingerprint mismatch: bank {cfg.get('fingerprint')} != unembed {unembed.fingerprint()}")


def load_bank(in_dir: str | Path, unembed: FoldedUnembed) -> LensBank:
    """Return the bank saved in ``in_dir``, bound to ``unembed`` after compatibility checks."""
    cfg = read_bank_config(in_dir)
    if cfg.get("format") != FORMAT_VERSION:
        raise ValueError(f"format mismatch: file has {cfg.get('format')}, expected {FORMAT_VERSION}")
    check_compatible(cfg, unembed)
    tensors = load_file(str(Path(in_dir) / WEIGHTS_NAME), device="cpu")  # host: read, then moved with the bank
    return bank_from_tensors(cfg, tensors, unembed)


def bank_from_tensors(cfg: dict, tensors: dict[str, Tensor], unembed: FoldedUnembed) -> LensBank:
    """Return a bank of config `cfg` (LensConfig fields, n_heads, layer) holding `tensors`, bound to `unembed`.

    Raises a one-line ValueError when a tensor is missing, unexpected or of another shape than `cfg` implies.
    """
    config = LensConfig(**{k: cfg[k] for k in LensConfig.__dataclass_fields__})
    bank = LensBank(unembed, cfg["n_heads"], config, layer=cfg.get("layer"))
    expected = bank.state_dict()
    for name, t in tensors.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"shape mismatch for {name}: file {tuple(t.shape)} != expected {tuple(expected[name].shape)}"
            )
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"tensor name mismatch: missing {missing}, unexpected {unexpected}")
    bank.load_state_dict(tensors)
    return bank


class UnembedLens(nn.Module):
    """PEFT base for exported heads: ``lens = Linear(d_model, vocab)`` with W_fold."""

    def __init__(self, unembed: FoldedUnembed, with_fold_bias: bool = False) -> None:
        super().__init__()
        W = unembed.W.detach()
        self.lens = nn.Linear(W.shape[1], W.shape[0], bias=True, dtype=W.dtype, device=W.device)
        with torch.no_grad():
            self.lens.weight.copy_(W)
            # Zero by default so a loaded adapter reproduces bank.head_logits
            # exactly; with_fold_bias=True gives the model-style logits instead.
            self.lens.bias.copy_(unembed.b if with_fold_bias else torch.zeros_like(unembed.b))
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[..., vocab]`` for lens inputs ``x [..., d_model]``."""
        return self.lens(x)


def head_lora_factors(bank: LensBank, head: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(A [r, d_model], B [vocab, r], lora_B_bias [vocab])`` for one head, peft-scaled."""
    if bank.config.form == "full":
        raise ValueError("form 'full' has no low-rank adapter to export; use form 'lora' or 'residual'")
    p = bank.head_parameters(head)
    scale = bank.config.scale
    if bank.config.form == "lora":
        A, B = p["lora_A"], p["lora_B"]
    else:
        # W_fold (x + s U V x) = W_fold x + s (W_fold U)(V x): a rank-r LoRA on the logits.
        W = bank.unembed.W
        A, B = p["res_V"], W @ p["res_U"].to(W.dtype)
    return A, B, p["bias"] / scale


def export_head_adapter(bank: LensBank, head: int, out_dir: str | Path) -> Path:
    """Write head ``head`` as a PEFT LoRA adapter loadable onto ``UnembedLens`` and return the dir."""
    from peft import LoraConfig, get_peft_model

    A, B, b = head_lora_factors(bank, head)
    cfg = bank.config
    base = UnembedLens(bank.unembed)
    lora_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=[TARGET_MODULE],
        lora_dropout=0.0,
        bias="none",
        lora_bias=True,
        init_lora_weights=False,
    )
    model = get_peft_model(base, lora_cfg)
    layer = model.base_model.model.lens
    dt = layer.lora_A["default"].weight.dtype
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A.to(dt))
        layer.lora_B["default"].weight.copy_(B.to(dt))
        layer.lora_B["default"].bias.copy_(b.to(dt))
    out = Path(out_dir)
    with warnings.catch_warnings():
        # peft's ZeRO/FSDP "unsharded tensor" check flags any 1-D ".lora_B" tensor,
        # including the legitimate lora_bias vector; silence exactly that case.
        warnings.filterwarnings("ignore", message=_BIAS_FALSE_ALARM)
        model.save_pretrained(str(out))
    meta = {"fingerprint": bank.unembed.fingerprint(), "layer": bank.layer, "head": head, **cfg.to_dict()}
    (out / "lens_head.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
