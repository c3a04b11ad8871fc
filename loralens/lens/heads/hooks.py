"""Hooks on the unmodified HF model that capture per-head attention inputs and the final residual."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from loralens.lens.runtime.adapters import ArchAdapter


@dataclass
class Capture:
    """What one forward pass left behind: `z[layer]` `[batch, pos, heads*d_head]`, outputs, final residual."""

    z: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_out: dict[int, torch.Tensor] = field(default_factory=dict)
    final_resid: torch.Tensor | None = None


@contextmanager
def capture(
    model: nn.Module,
    adapter: ArchAdapter,
    layers: Iterable[int],
    *,
    attn_out: bool = False,
    final_resid: bool = True,
) -> Iterator[Capture]:
    """Yield a Capture filled by each forward pass; hooks are removed on exit.

    `z` is the output projection's input (per-head results before W_O, bias not applied), which is
    H times smaller than the per-head contributions; those are recomputed with `head_contributions`.
    Tensors are references, not copies: read them before the next forward pass.
    """
    cap = Capture()
    handles = []

    def z_hook(layer: int):
        def hook(_module, args):
            cap.z[layer] = args[0].detach()

        return hook

    def out_hook(layer: int):
        def hook(_module, _args, output):
            cap.attn_out[layer] = output.detach()

        return hook

    def final_hook(_module, args):
        cap.final_resid = args[0].detach()

    try:
        for layer in layers:
            proj = adapter.out_proj(model, layer)
            handles.append(proj.register_forward_pre_hook(z_hook(layer)))
            if attn_out:
                handles.append(proj.register_forward_hook(out_hook(layer)))
        if final_resid:
            handles.append(adapter.final_norm(model).register_forward_pre_hook(final_hook))
        yield cap
    finally:
        for h in handles:
            h.remove()


def split_heads(z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Return z `[..., heads*d_head]` viewed as `[..., heads, d_head]`."""
    return z.unflatten(-1, (n_heads, z.shape[-1] // n_heads))


def head_contributions(z: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """Return per-head residual contributions `[..., heads, d_model]` from z `[..., heads*d_head]`.

    `w_o` is `[heads, d_head, d_model]`; no output bias is added (it belongs to no head).
    """
    zh = split_heads(z, w_o.shape[0]).to(w_o.dtype)
    return torch.einsum("...hd,hdm->...hm", zh, w_o)
