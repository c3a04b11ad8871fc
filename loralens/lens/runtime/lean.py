"""Lean loading: read only the frozen tensors a lens stage needs, straight from the model's safetensors files.

Training, decode and attribute never run the model. They need the unembedding (`lm_head`, or the input
embedding when the weights are tied), the final norm, and each lensed layer's attention output projection:
for Llama-3-8B 0.56 B of its 8.0 B parameters. `read_frozen_parts` opens the checkpoint with `safe_open`
(one file or a sharded `model.safetensors.index.json` checkpoint) and reads exactly those tensors, in their
stored dtype; no model object is constructed. Folding the norm into the unembedding is done in float32
whatever the stored dtype (:func:`loralens.lens.runtime.adapters.fold_unembedding`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from loralens.lens.runtime.adapters import ArchAdapter, ModelDims, adapter_for, fold_unembedding, heads_w_o, model_dims

log = logging.getLogger(__name__)
SAFETENSORS_INDEX = "model.safetensors.index.json"


class LeanLoadError(ValueError):
    """The checkpoint lacks a tensor the lens stages need."""


@dataclass
class FrozenParts:
    """The frozen tensors of a model that its lenses use, in the dtype the checkpoint stores them.

    `unembed_w` `[V, d]`; `unembed_b` `[V]` or None; `norm_w`, `norm_b` `[d]` (final norm; bias None for RMSNorm);
    `out_proj` layer -> the output projection's weight as the module stores it (`[d, H*dh]`, Conv1D transposed).
    """

    adapter: ArchAdapter
    dims: ModelDims
    unembed_w: Tensor
    unembed_b: Tensor | None
    norm_w: Tensor
    norm_b: Tensor | None
    out_proj: dict[int, Tensor]

    def folded(self) -> tuple[Tensor, Tensor]:
        """Return the fp32 folded unembedding `(W [V, d], b [V])`."""
        return fold_unembedding(self.unembed_w, self.unembed_b, self.norm_w, self.norm_b, self.adapter.norm_kind)

    def w_o(self, layer: int) -> Tensor:
        """Return layer `layer`'s W_O as fp32 `[heads, d_head, d_model]`."""
        if layer not in self.out_proj:
            raise LeanLoadError(f"layer {layer} was not loaded (loaded: {sorted(self.out_proj)})")
        return heads_w_o(self.out_proj[layer], self.adapter, self.dims).float()

    def lm_head(self) -> tuple[Tensor, Tensor | None]:
        """Return the fp32 unembedding `[V, d]` and its bias (the exact loss recomputes the model's logits)."""
        return self.unembed_w.float(), None if self.unembed_b is None else self.unembed_b.float()

    def as_float32(self) -> FrozenParts:
        """Return these parts with every tensor in float32 (a fp32 tensor is kept as is, not copied)."""
        f = lambda t: None if t is None else t.float()  # noqa: E731
        return FrozenParts(self.adapter, self.dims, f(self.unembed_w), f(self.unembed_b), f(self.norm_w),
                           f(self.norm_b), {layer: w.float() for layer, w in self.out_proj.items()})

    @property
    def nbytes(self) -> int:
        """Return the bytes held, as stored."""
        tensors = [self.unembed_w, self.unembed_b, self.norm_w, self.norm_b, *self.out_proj.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def parts_from_model(adapter: ArchAdapter, model: nn.Module, dims: ModelDims, layers: list[int]) -> FrozenParts:
    """Return the FrozenParts of an already built model (the stages that run it: cache, intervene)."""
    norm = adapter.final_norm(model)
    unembed = model.get_output_embeddings()
    return FrozenParts(adapter=adapter, dims=dims, unembed_w=unembed.weight.detach(),
                       unembed_b=_detached(getattr(unembed, "bias", None)), norm_w=norm.weight.detach(),
                       norm_b=_detached(getattr(norm, "bias", None)),
                       out_proj={layer: adapter.out_proj(model, layer).weight.detach() for layer in layers})


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


# -- safetensors checkpoints --------------------------------------------------------------------------
def has_safetensors(folder: Path) -> bool:
    """Return True when the folder holds a safetensors checkpoint (single file or sharded)."""
    return (folder / SAFETENSORS_INDEX).exists() or any(folder.glob("*.safetensors"))


def safetensors_index(folder: Path) -> dict[str, Path]:
    """Return tensor name -> file for a single-file or sharded safetensors checkpoint (reads headers only)."""
    from safetensors import safe_open

    index = folder / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    out: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({name: f for name in st.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def read_tensors(files: dict[str, Path]) -> dict[str, Tensor]:
    """Return the named tensors, opening each checkpoint file once (`files`: tensor name -> file)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    out = {}
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as st:
            for name in names:
                out[name] = st.get_tensor(name)
    return out


def _find(index: dict[str, Path], module_path: str, param: str) -> str | None:
    """Return the checkpoint's name of `module_path.param`, with or without the base model's prefix."""
    full = f"{module_path}.{param}"
    candidates = [full, full.split(".", 1)[1]] if "." in module_path else [full]  # hub GPT-2 has no 'transformer.'
    return next((c for c in candidates if c in index), None)


def read_frozen_parts(folder: Path, config, layers: list[int]) -> FrozenParts:
    """Return the FrozenParts of `layers` read from the safetensors checkpoint in `folder` (no model built)."""
    adapter = adapter_for(config.model_type)
    dims = model_dims(config)
    index = safetensors_index(folder)
    wanted: dict[str, str | None] = {}

    def need(key: str, module_path: str, param: str, required: bool = True) -> None:
        name = _find(index, module_path, param)
        if name is None and required:
            raise LeanLoadError(f"model checkpoint {folder} has no tensor '{module_path}.{param}'")
        wanted[key] = name

    head = adapter.lm_head_path if _find(index, adapter.lm_head_path, "weight") else adapter.embed_path
    if head == adapter.embed_path and not getattr(config, "tie_word_embeddings", True):
        raise LeanLoadError(f"model checkpoint {folder} has no '{adapter.lm_head_path}.weight' and its config "
                            "does not tie the embeddings")
    need("unembed_w", head, "weight")
    need("unembed_b", head, "bias", required=False)
    need("norm_w", adapter.final_norm_path, "weight")
    need("norm_b", adapter.final_norm_path, "bias", required=False)
    for layer in layers:
        if not 0 <= layer < dims.n_layers:
            raise LeanLoadError(f"layer {layer} is out of range: the model has {dims.n_layers} layers")
        need(f"out_proj.{layer}", f"{adapter.layers_path}.{layer}.{adapter.out_proj_path}", "weight")
    tensors = read_tensors({name: index[name] for name in wanted.values() if name is not None})
    get = lambda key: None if wanted[key] is None else tensors[wanted[key]]  # noqa: E731
    return FrozenParts(adapter=adapter, dims=dims, unembed_w=get("unembed_w"), unembed_b=get("unembed_b"),
                       norm_w=get("norm_w"), norm_b=get("norm_b"),
                       out_proj={layer: get(f"out_proj.{layer}") for layer in layers})


@dataclass
class LeanModel:
    """What the lens-only stages load of a model: its frozen parts, tokenizer, folder and fingerprint."""

    parts: FrozenParts
    tokenizer: object
    path: str
    fingerprint: str

    @property
    def dims(self) -> ModelDims:
        """Return the model's lens sizes."""
        return self.parts.dims

    @property
    def adapter(self) -> ArchAdapter:
        """Return the architecture adapter."""
        return self.parts.adapter


def load_lean(name: str, home: Path, layers: list[int], *, revision: str | None = None,
              trust_remote_code: bool = False) -> LeanModel:
    """Return the LeanModel of `layers` of model `name` (embedded alias, folder or hub id).

    A checkpoint without safetensors (a `.bin` folder) is loaded whole through `from_pretrained` once and its
    parts kept; everything else of the model is freed.
    """
    from transformers import AutoConfig

    from loralens.lens.runtime.models import folder_fingerprint, load_model, load_tokenizer, resolve_model_path

    path = Path(resolve_model_path(name, home, revision))
    if not has_safetensors(path):
        log.warning("%s has no safetensors checkpoint: building the whole model once to take its lens weights", path)
        loaded = load_model(name, home, dtype="float32", revision=revision, trust_remote_code=trust_remote_code)
        parts = parts_from_model(loaded.adapter, loaded.model, loaded.dims, layers)
        return LeanModel(parts, loaded.tokenizer, loaded.path, loaded.fingerprint)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    parts = read_frozen_parts(path, config, layers)
    return LeanModel(parts, load_tokenizer(path, trust_remote_code), str(path), folder_fingerprint(path))
