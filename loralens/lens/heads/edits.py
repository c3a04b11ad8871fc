"""Inference-time edits of chosen attention heads on the unmodified HF model.

Every edit is a forward pre-hook on the adapter's output projection that rewrites that head's slice of
z (the projection's input, `[batch, pos, heads*d_head]`). Acting on z rather than on the projection's
output makes the edits exact per head and identical for Linear, GPT-2 Conv1D and wide-head (Qwen3)
projections alike; the projection bias belongs to no head and is never touched.

Hooks run in registration order, so several interventions (or nested `intervene` contexts) compose:
later ones see z as already edited by earlier ones. A `hooks.capture` entered inside `intervene` sees
the edited z; one entered outside sees the original z.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from loralens.lens.heads.head_sets import Head, format_heads, parse_head_list
from loralens.lens.heads.hooks import capture, split_heads
from loralens.lens.runtime.adapters import ArchAdapter, ModelDims, adapter_for, model_dims, out_proj_weight

if TYPE_CHECKING:
    from loralens.lens.runtime.models import LoadedModel

Kind = Literal["zero", "mean", "scale", "project", "steer", "reverse"]
KINDS: tuple[str, ...] = ("zero", "mean", "scale", "project", "steer", "reverse")
Z_DIRECTION_KINDS = ("steer", "reverse")  # kinds whose `z_directions` are per-head `[d_head]` directions

# Edits one head's z slice `[..., d_head]` -> `[..., d_head]`.
HeadEdit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields make field-wise equality/hash meaningless
class HeadIntervention:
    """One edit applied to a set of heads.

    - `zero`: z_h := 0, so the layer's output loses exactly c_h = z_h @ W_O[h].
    - `mean`: z_h := means[(layer, head)] `[d_head]` at every position (mean ablation).
    - `scale`: z_h := factor * z_h.
    - `project`: z_h := z_h - (z_h . w_hat) w_hat with w = W_O[h] @ u. The head's write along u becomes
      exactly zero; its other writes change only by the part of z_h along w. `direction` is u `[d_model]`,
      shared by all heads or given per (layer, head); its scale is irrelevant.
    - `steer`: z_h := z_h - factor * sigma_h * d_hat_h at every position (a constant shift, ITI style), with
      `z_directions[(layer, head)]` = d_h `[d_head]` (normalized here) and `sigmas[(layer, head)]` = sigma_h, the
      spread of z_h along d_hat_h (default 1), so `factor` is a strength in standard deviations.
    - `reverse`: z_h := z_h - factor * max(0, z_h . d_hat_h) d_hat_h: only the positive part of z_h along d_hat_h
      is removed (factor 1) or reversed (factor > 1), Toxification-Reversal style; where z_h . d_hat_h <= 0 the
      head is untouched.
    """

    kind: Kind
    heads: tuple[Head, ...]
    factor: float = 0.0
    means: Mapping[Head, torch.Tensor] | None = None
    direction: torch.Tensor | Mapping[Head, torch.Tensor] | None = None
    z_directions: Mapping[Head, torch.Tensor] | None = None
    sigmas: Mapping[Head, float] | None = None

    def __post_init__(self) -> None:
        # Accept lists of lists from callers/configs; store the canonical hashable form.
        object.__setattr__(self, "heads", tuple((int(layer), int(head)) for layer, head in self.heads))
        if self.kind not in KINDS:
            raise ValueError(f"kind: unknown intervention kind '{self.kind}'; expected one of {', '.join(KINDS)}")
        if not math.isfinite(self.factor):
            raise ValueError(f"factor: must be finite, got {self.factor}")
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads: duplicate heads in {format_heads(self.heads)}")


def _direction_for(iv: HeadIntervention, head: Head) -> torch.Tensor:
    """Return u `[d_model]` for one head of a `project` intervention, or raise naming `direction`."""
    if iv.direction is None:
        raise ValueError("direction: required for kind 'project'")
    if isinstance(iv.direction, torch.Tensor):
        return iv.direction
    if head not in iv.direction:
        raise ValueError(f"direction: missing for head {format_heads([head])}")
    return iv.direction[head]


def validate(iv: HeadIntervention, dims: ModelDims) -> None:
    """Raise a one-line ValueError naming the offending field if `iv` does not fit a model of `dims`."""
    for layer, head in iv.heads:
        if not 0 <= layer < dims.n_layers:
            raise ValueError(f"heads: layer {layer} out of range [0, {dims.n_layers})")
        if not 0 <= head < dims.n_heads:
            raise ValueError(f"heads: head {head} of layer {layer} out of range [0, {dims.n_heads})")
    if iv.kind == "mean":
        for head in iv.heads:
            mean = None if iv.means is None else iv.means.get(head)
            if mean is None:
                raise ValueError(f"means: missing for head {format_heads([head])}")
            if tuple(mean.shape) != (dims.d_head,):
                raise ValueError(f"means: head {format_heads([head])} has shape {tuple(mean.shape)}, "
                                 f"expected ({dims.d_head},)")
    if iv.kind == "project":
        for head in iv.heads:
            u = _direction_for(iv, head)
            if tuple(u.shape) != (dims.d_model,):
                raise ValueError(f"direction: shape {tuple(u.shape)}, expected ({dims.d_model},)")
            if not torch.isfinite(u).all():
                raise ValueError("direction: must be finite")
            if u.float().norm() == 0:
                raise ValueError("direction: must be non-zero")
    if iv.kind in Z_DIRECTION_KINDS:
        for head in iv.heads:
            d = None if iv.z_directions is None else iv.z_directions.get(head)
            if d is None:
                raise ValueError(f"z_directions: missing for head {format_heads([head])}")
            if tuple(d.shape) != (dims.d_head,):
                raise ValueError(f"z_directions: head {format_heads([head])} has shape {tuple(d.shape)}, "
                                 f"expected ({dims.d_head},)")
            if not torch.isfinite(d).all() or d.float().norm() == 0:
                raise ValueError(f"z_directions: head {format_heads([head])} must be finite and non-zero")


def _project_out(w_hat: torch.Tensor) -> HeadEdit:
    """Return an edit removing z's component along unit `w_hat` `[d_head]` (in fp32, for bf16 models)."""

    def edit(z_h: torch.Tensor) -> torch.Tensor:
        z32 = z_h.float()
        return (z32 - (z32 @ w_hat)[..., None] * w_hat).to(z_h.dtype)

    return edit


def _steer(shift: torch.Tensor) -> HeadEdit:
    """Return an edit subtracting the constant `shift` `[d_head]` from z at every position."""

    def edit(z_h: torch.Tensor) -> torch.Tensor:
        return (z_h.float() - shift).to(z_h.dtype)

    return edit


def _reverse(d_hat: torch.Tensor, factor: float) -> HeadEdit:
    """Return an edit removing `factor` times the positive part of z's component along unit `d_hat` `[d_head]`."""

    def edit(z_h: torch.Tensor) -> torch.Tensor:
        z32 = z_h.float()
        return (z32 - factor * (z32 @ d_hat).clamp_min(0)[..., None] * d_hat).to(z_h.dtype)

    return edit


def _head_edit(iv: HeadIntervention, model: nn.Module, adapter: ArchAdapter, dims: ModelDims, head: Head) -> HeadEdit:
    """Return the edit of one head's z slice `[..., d_head]`, with constants prepared once, on the model's device."""
    layer, h = head
    if iv.kind == "zero":
        return torch.zeros_like
    if iv.kind == "scale":
        factor = iv.factor
        return lambda z_h: z_h * factor
    device = adapter.out_proj(model, layer).weight.device
    if iv.kind == "mean":
        mean = iv.means[head].detach().to(device)
        return lambda z_h: mean.to(z_h.dtype).expand_as(z_h)
    if iv.kind in Z_DIRECTION_KINDS:
        d = iv.z_directions[head].detach().to(device=device, dtype=torch.float32)
        d_hat = d / d.norm()
        if iv.kind == "reverse":
            return _reverse(d_hat, iv.factor)
        sigma = 1.0 if iv.sigmas is None else float(iv.sigmas.get(head, 1.0))
        return _steer(iv.factor * sigma * d_hat)
    u = _direction_for(iv, head).detach().to(device=device, dtype=torch.float32)
    w_o = out_proj_weight(adapter, model, layer, dims)[h].detach().float()  # [d_head, d_model]
    w = w_o @ (u / u.norm())  # [d_head]: c_h . u_hat = z_h . w
    norm = w.norm()
    if norm == 0:  # u is orthogonal to everything this head can write: nothing to remove
        return lambda z_h: z_h
    return _project_out(w / norm)


def _layer_hook(n_heads: int, edits: list[tuple[int, HeadEdit]]):
    """Return a pre-hook that rewrites the given heads' slices of z `[batch, pos, heads*d_head]`."""

    def hook(_module, args):
        # Clone rather than edit in place: the attention module may still hold the original tensor.
        zh = split_heads(args[0], n_heads).clone()  # [batch, pos, heads, d_head]
        for h, edit in edits:
            zh[..., h, :] = edit(zh[..., h, :])
        return (zh.flatten(-2), *args[1:])

    return hook


@contextmanager
def intervene(
    model: nn.Module,
    adapter: ArchAdapter,
    interventions: Sequence[HeadIntervention] | HeadIntervention,
    dims: ModelDims | None = None,
) -> Iterator[None]:
    """Apply `interventions` in order to every forward pass inside the context; hooks are removed on exit.

    Everything is validated before any hook is registered. Interventions with no heads register
    nothing, so the model's outputs stay bit-identical.
    """
    if isinstance(interventions, HeadIntervention):
        interventions = [interventions]
    dims = dims or model_dims(model.config)
    for iv in interventions:
        validate(iv, dims)
    plan: list[tuple[int, list[tuple[int, HeadEdit]]]] = []
    for iv in interventions:
        by_layer: dict[int, list[tuple[int, HeadEdit]]] = {}
        for layer, h in iv.heads:
            by_layer.setdefault(layer, []).append((h, _head_edit(iv, model, adapter, dims, (layer, h))))
        plan.extend(sorted(by_layer.items()))
    handles = []
    try:
        for layer, edits in plan:
            hook = _layer_hook(dims.n_heads, edits)
            handles.append(adapter.out_proj(model, layer).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def ablate(
    model: nn.Module,
    heads: Iterable[Head] | str,
    kind: Kind = "zero",
    *,
    factor: float = 0.0,
    means: Mapping[Head, torch.Tensor] | None = None,
    direction: torch.Tensor | Mapping[Head, torch.Tensor] | None = None,
    z_directions: Mapping[Head, torch.Tensor] | None = None,
    sigmas: Mapping[Head, float] | None = None,
    adapter: ArchAdapter | None = None,
    dims: ModelDims | None = None,
) -> Iterator[None]:
    """Edit `heads` ([(layer, head), ...] or "L3H1,L5H0") of a loaded HF causal LM inside the context.

    `kind` is one of KINDS (see HeadIntervention): "zero" removes the heads, "mean" sets their z to `means`,
    "scale" multiplies it by `factor`, "project" removes their write along `direction` `[d_model]`, "steer" shifts
    them by `-factor * sigma_h * d_hat_h` and "reverse" removes `factor` times their positive part along d_hat_h
    (`z_directions` `[d_head]`). The model's
    family is found from `model.config.model_type` unless `adapter` is given. No heads: the model is untouched.
    The intervene stage applies its conditions through this same function.
    """
    if isinstance(heads, str):
        heads = parse_head_list(heads)
    adapter = adapter or adapter_for(model.config.model_type)
    iv = HeadIntervention(kind=kind, heads=tuple(heads), factor=factor, means=means, direction=direction,
                          z_directions=z_directions, sigmas=sigmas)
    with intervene(model, adapter, [iv] if iv.heads else [], dims):
        yield


def _unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (input_ids, attention_mask) from a pair or a tokenizer-style mapping."""
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch.get("attention_mask")
    input_ids, attention_mask = batch
    return input_ids, attention_mask


@torch.no_grad()
def mean_head_z(
    model: nn.Module,
    adapter: ArchAdapter,
    dims: ModelDims,
    batches: Iterable,
    layers: Iterable[int],
) -> dict[Head, torch.Tensor]:
    """Return each head's mean z `[d_head]` (fp32, CPU) over the real (non-pad) tokens of `batches`.

    `batches` yields (input_ids `[batch, pos]`, attention_mask `[batch, pos]` or None) pairs, or mappings
    with those keys (tokenizer output). The result feeds `HeadIntervention(kind="mean", means=...)`.
    """
    from tqdm.auto import tqdm

    layers = list(layers)
    device = next(model.parameters()).device  # where the inputs go (under a device_map: the first layer's)
    sums: dict[int, torch.Tensor] = {}  # per layer, on that layer's device (several GPUs under a device_map)
    count = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    with capture(model, adapter, layers, final_resid=False) as cap:
        for batch in tqdm(batches, total=total, desc="mean z", unit="batch"):
            input_ids, mask = _unpack_batch(batch)
            input_ids = input_ids.to(device)
            mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
            model(input_ids=input_ids, attention_mask=mask)
            real = mask.bool()  # [batch, pos]
            count += int(real.sum())
            for layer in layers:
                z = cap.z[layer]
                part = z[real.to(z.device)].double().sum(0)  # [z_width]
                sums[layer] = part if layer not in sums else sums[layer] + part
    if count == 0:
        raise ValueError("batches: no real (non-pad) tokens to average over")
    out: dict[Head, torch.Tensor] = {}
    for layer in layers:
        per_head = split_heads((sums[layer] / count).float().cpu(), dims.n_heads)  # [heads, d_head]
        for h in range(dims.n_heads):
            out[(layer, h)] = per_head[h].clone()
    return out


def text_head_means(loaded: LoadedModel, layers: Sequence[int], text: str, mean_tokens: int,
                    window: int = 128, batch: int = 8) -> dict[Head, torch.Tensor]:
    """Return each head's mean z `[d_head]` (fp32, host) over the first `mean_tokens` tokens of `text`, run in
    windows of `window` tokens, `batch` windows per forward pass (the last, shorter window padded and masked out).
    The intervene stage's `mean` edit and `Lenses.effect_means` use these."""
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:mean_tokens]
    windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    batches = []
    for i in range(0, len(windows), batch):
        group = windows[i:i + batch]
        width = max(len(w) for w in group)
        tokens = torch.zeros(len(group), width, dtype=torch.long)  # host: mean_head_z moves each batch to the model
        mask = torch.zeros(len(group), width, dtype=torch.long)  # host
        for row, w in enumerate(group):
            tokens[row, :len(w)], mask[row, :len(w)] = torch.tensor(w), 1  # host
        batches.append((tokens, mask))
    return mean_head_z(loaded.model, loaded.adapter, loaded.dims, batches, layers)
