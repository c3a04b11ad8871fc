"""Reading heads through lenses: logits under the trained and the logit lens, top-k.

Shapes: `n` positions, `H` heads of one layer, `d` d_model, `V` vocabulary, `k` kept tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from loralens.lens.heads.head_scores import direct_logit, expected_toxicity_parts
from loralens.lens.lenses.lens_set import FoldedUnembed, LensBank
from loralens.lens.lenses.peft_io import load_bank
from loralens.lens.runtime.lean import LeanModel

LENSES = ("trained", "logit")


def head_logits_both(bank: LensBank, x: Tensor) -> tuple[Tensor, Tensor]:
    """Return `(trained, logit)` per-head logits, each `[n, H, V]` fp32, sharing the logit-lens projection.

    The logit lens is `W_fold x_h` without the folded bias (which belongs to no head); the trained lens adds
    its low-rank update and per-head bias on top of that same projection.
    """
    with torch.no_grad():
        base = bank.unembed(x).float()
        trained = bank.head_logits(x, base if bank.config.form == "lora" else None).float()
    return trained, base


READOUTS = ("logit", "lens", "relative", "logit_relative")


def relative_to_layer(logits: Tensor) -> Tensor:
    """Return each head's logits minus the mean over its layer's heads, `[n, H, V]` -> `[n, H, V]`.

    What the head pushes that its layer's other heads do not: a part every head shares (the joint objective's
    per-head biases are equal by symmetry, so their share of the layer's prior; a common frequent-token direction)
    cancels, and a head's own distinct tokens remain.
    """
    return logits - logits.mean(dim=1, keepdim=True)


def head_readouts(bank: LensBank, x: Tensor) -> dict[str, Tensor]:
    """Return every read-out of `READOUTS` of the heads of one layer, each `[n, H, V]` fp32, from lens inputs `x`.

    logit: `W_fold x_h`; lens: the head's trained lens; relative / logit_relative: those two, each minus its
    layer's mean over heads (:func:`relative_to_layer`).
    """
    lens, logit = head_logits_both(bank, x)
    return {"logit": logit, "lens": lens, "relative": relative_to_layer(lens),
            "logit_relative": relative_to_layer(logit)}


@dataclass(frozen=True)
class TopK:
    """The k most likely tokens of each head at each position."""

    ids: Tensor  # [n, H, k] int64
    logits: Tensor  # [n, H, k]
    probs: Tensor  # [n, H, k] probability under the full-vocabulary softmax


def top_k(logits: Tensor, k: int) -> TopK:
    """Return the top-k tokens of `[n, H, V]` logits with their full-softmax probabilities."""
    vals, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    probs = (vals - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    return TopK(ids=ids, logits=vals, probs=probs)


@dataclass(frozen=True)
class LensReadout:
    """What one lens says about every head at every position of a chunk."""

    top: TopK
    expected_toxicity: Tensor  # [n, H] fp32: E_{v ~ softmax(logits)} tox[v]


def read_lens(logits: Tensor, k: int, tox: Tensor) -> LensReadout:
    """Return the top-k tokens (full-softmax probabilities) and the expected token toxicity of `[n, H, V]` logits.

    One read of the block for the top-k, one in-place pass for `exp(logits - max)`: `logits` is overwritten
    (the caller's block becomes scratch), so no second `[n, H, V]` buffer is allocated. `tox` is `[V]`.
    """
    vals, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    peak = vals[..., :1]  # the row maximum: softmax(l) = exp(l - max) / sum exp(l - max)
    expected, z = expected_toxicity_parts(logits, tox, peak=peak, in_place=True)  # [n, H] each
    probs = (vals - peak).exp() / z[..., None]
    return LensReadout(TopK(ids=ids, logits=vals, probs=probs), expected)


@dataclass(frozen=True)
class HeadReadout:
    """Everything decode and attribute need from one chunk of one layer, each `[chunk, H, V]` block built once."""

    trained: LensReadout
    logit: LensReadout
    direct_logit: Tensor  # [n, H]: the head's logit push along the toxic direction, `x_h . u`


def read_heads(bank: LensBank, x: Tensor, k: int, tox: Tensor, toxic_dir: Tensor) -> HeadReadout:
    """Return both lenses' top-k and expected toxicity, and the direct logit attribution, of lens inputs `x`.

    `x [n, H, d]`, `tox [V]` per-token toxicity, `toxic_dir [d]` = `W_fold^T (tox - mean tox)`. The logit lens
    projection is shared with the trained lens (see `head_logits_both`); each block is then read once.
    """
    trained, logit = head_logits_both(bank, x)
    return HeadReadout(trained=read_lens(trained, k, tox), logit=read_lens(logit, k, tox),
                       direct_logit=direct_logit(x, toxic_dir))


def row_chunks(n: int, chunk: int) -> Iterator[slice]:
    """Return slices covering `range(n)` in chunks, so `[chunk, H, V]` is the largest buffer built."""
    return (slice(s, min(s + chunk, n)) for s in range(0, n, chunk))


class LensMismatchError(ValueError):
    """A saved lens bank does not belong to the model it is being applied to."""


@dataclass
class HeadReader:
    """Everything needed to read heads of some layers: shared base, each layer's W_O and trained bank."""

    unembed: FoldedUnembed
    w_o: dict[int, Tensor]  # layer -> [H, d_head, d]
    banks: dict[int, LensBank]

    @property
    def layers(self) -> list[int]:
        """Return the layers, ascending."""
        return sorted(self.banks)

    @property
    def device(self) -> torch.device:
        """Return the device the lenses live on."""
        return self.unembed.W.device

    def to(self, device: torch.device | str) -> HeadReader:
        """Move the shared base, every W_O and every bank to `device` (in place); return self."""
        self.unembed.to(device)  # the banks hold this same module: moved once
        self.w_o = {layer: w.to(device) for layer, w in self.w_o.items()}
        for bank in self.banks.values():
            bank.to(device)
        return self


def load_head_reader(loaded: LeanModel, bank_dirs: Mapping[int, Path]) -> HeadReader:
    """Return a HeadReader for `loaded` with the banks saved in `bank_dirs` (layer -> folder).

    Raises LensMismatchError (one line) when a bank was trained for another model or has another shape.
    """
    dims = loaded.dims
    unembed = FoldedUnembed(*loaded.parts.folded())
    banks, w_o = {}, {}
    for layer, folder in sorted(bank_dirs.items()):
        if not 0 <= layer < dims.n_layers:
            raise LensMismatchError(f"lens bank {folder} is for layer {layer}, but the model has {dims.n_layers}")
        try:
            bank = load_bank(folder, unembed)
        except Exception as err:  # noqa: BLE001 - a truncated safetensors file raises its own error type
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise LensMismatchError(f"lens bank {folder} is unreadable or does not match model {loaded.path}: "
                                    f"{reason}") from None
        if bank.n_heads != dims.n_heads:
            raise LensMismatchError(f"lens bank {folder} has {bank.n_heads} heads, the model has {dims.n_heads}")
        bank.eval()
        banks[layer] = bank
        if layer not in loaded.parts.out_proj:
            raise LensMismatchError(f"lens bank {folder} is for layer {layer}, which was not loaded")
        w_o[layer] = loaded.parts.w_o(layer)
    return HeadReader(unembed=unembed, w_o=w_o, banks=banks)
