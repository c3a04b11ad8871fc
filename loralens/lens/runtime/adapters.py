"""Architecture adapters: the one place that knows where a Hugging Face causal LM keeps its parts.

Per family: the decoder layers, each layer's attention output projection (whose INPUT `z` is the
concatenation of the per-head attention results), the final norm and the unembedding. Everything else
in Lora Lens asks an adapter, never the model's attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class ArchAdapter:
    """Where one architecture family keeps its layers, output projections, final norm and unembedding."""

    family: str
    model_types: tuple[str, ...]
    layers_path: str
    out_proj_path: str  # relative to a layer
    final_norm_path: str
    norm_kind: Literal["rms", "layer"]
    embed_path: str  # input embedding: the unembedding of a model with tied weights
    lm_head_path: str
    conv1d: bool = False  # GPT-2's Conv1D stores the weight as [in, out]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """Return the decoder layers."""
        return model.get_submodule(self.layers_path)

    def out_proj(self, model: nn.Module, layer: int) -> nn.Module:
        """Return layer `layer`'s attention output projection (o_proj / c_proj / dense)."""
        return self.layers(model)[layer].get_submodule(self.out_proj_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """Return the norm applied before the unembedding."""
        return model.get_submodule(self.final_norm_path)


FAMILIES: tuple[ArchAdapter, ...] = (
    ArchAdapter(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers_path="model.layers",
        out_proj_path="self_attn.o_proj",
        final_norm_path="model.norm",
        norm_kind="rms",
        embed_path="model.embed_tokens",
        lm_head_path="lm_head",
    ),
    ArchAdapter(
        family="gpt2",
        model_types=("gpt2",),
        layers_path="transformer.h",
        out_proj_path="attn.c_proj",
        final_norm_path="transformer.ln_f",
        norm_kind="layer",
        embed_path="transformer.wte",
        lm_head_path="lm_head",
        conv1d=True,
    ),
    ArchAdapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers_path="gpt_neox.layers",
        out_proj_path="attention.dense",
        final_norm_path="gpt_neox.final_layer_norm",
        norm_kind="layer",
        embed_path="gpt_neox.embed_in",
        lm_head_path="embed_out",
    ),
)


def supported_model_types() -> list[str]:
    """Return every HF `model_type` that has an adapter."""
    return sorted(t for a in FAMILIES for t in a.model_types)


def adapter_for(model_type: str) -> ArchAdapter:
    """Return the adapter for an HF `model_type`, or raise naming the supported ones."""
    for adapter in FAMILIES:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"unsupported architecture '{model_type}'; supported model types: {', '.join(supported_model_types())}"
    )


@dataclass(frozen=True)
class ModelDims:
    """Sizes the lens needs: layers, query heads, head dim, residual width, vocabulary."""

    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    vocab: int

    @property
    def z_width(self) -> int:
        """Width of the output projection's input: heads * d_head (== d_model except in e.g. Qwen3)."""
        return self.n_heads * self.d_head


def model_dims(config) -> ModelDims:
    """Return the lens-relevant sizes from an HF config (GPT-2 names them differently)."""
    d_model = getattr(config, "hidden_size", None) or config.n_embd
    n_heads = getattr(config, "num_attention_heads", None) or config.n_head
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    return ModelDims(n_layers=n_layers, n_heads=n_heads, d_head=d_head, d_model=d_model, vocab=config.vocab_size)


def heads_w_o(weight: torch.Tensor, adapter: ArchAdapter, dims: ModelDims) -> torch.Tensor:
    """Return an output projection's weight (as the module stores it) as `[heads, d_head, d_model]`."""
    w_in_out = weight if adapter.conv1d else weight.T  # -> [heads*d_head, d_model]
    return w_in_out.reshape(dims.n_heads, dims.d_head, dims.d_model)


def out_proj_weight(adapter: ArchAdapter, model: nn.Module, layer: int, dims: ModelDims) -> torch.Tensor:
    """Return W_O of one layer as `[heads, d_head, d_model]`, so that c_h = z_h @ W_O[h]."""
    return heads_w_o(adapter.out_proj(model, layer).weight, adapter, dims)


def out_proj_bias(adapter: ArchAdapter, model: nn.Module, layer: int) -> torch.Tensor | None:
    """Return the output projection's bias `[d_model]`, or None when it has none."""
    return getattr(adapter.out_proj(model, layer), "bias", None)


def norm_scale(adapter: ArchAdapter, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the final norm's per-token divisor `[..., 1]` for pre-norm residual `x` `[..., d_model]`."""
    norm = adapter.final_norm(model)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-5)
    x = x.float()
    if adapter.norm_kind == "rms":
        return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps)


def fold_unembedding(unembed_w: torch.Tensor, unembed_b: torch.Tensor | None, norm_w: torch.Tensor,
                     norm_b: torch.Tensor | None, norm_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (W `[vocab, d_model]`, b `[vocab]`) with the final norm folded in, computed in float32.

    For pre-norm residual x: logits = W @ (x / norm_scale(x)) + b exactly. The norm's gain is folded
    into W; a LayerNorm's mean-centering is folded in too (rows of W centred), and its bias into b.
    Whatever the stored dtype (bf16, fp16), the fold is done on fp32 copies.
    """
    u = unembed_w.detach().float()
    b = torch.zeros(u.shape[0], device=u.device)
    if norm_kind == "layer" and norm_b is not None:
        b = b + u @ norm_b.detach().float()
    gain = norm_w.detach().float()[None, :]
    # in place on a fresh fp32 copy: a bf16 Llama-3-8B unembedding would otherwise peak at two [V, d] fp32 copies
    w = u.mul_(gain) if u.data_ptr() != unembed_w.data_ptr() else u * gain
    if norm_kind == "layer":
        w.sub_(w.mean(dim=1, keepdim=True))
    if unembed_b is not None:
        b = b + unembed_b.detach().float()
    return w, b


def folded_unembedding(adapter: ArchAdapter, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Return :func:`fold_unembedding` of a built model's unembedding and final norm."""
    norm = adapter.final_norm(model)
    unembed = model.get_output_embeddings()
    return fold_unembedding(unembed.weight, getattr(unembed, "bias", None), norm.weight,
                            getattr(norm, "bias", None), adapter.norm_kind)
