"""Portable lenses: load a saved lens folder (or hub repository) onto a model, and export a home's lenses.

The folder layout is `loralens.lens.lenses.pretrained`'s: config.json, one safetensors file per layer, and the
token toxicity the lenses' readouts use. Loading refuses a model whose folded unembedding (`W_U` with the final
norm folded in) has another fingerprint than the one the lenses were trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralens.api.errors import ApiError
from loralens.api.lenses import Lenses, ModelSpec
from loralens.defaults import default_home
from loralens.lens.lenses.pretrained import LensFolderError, lens_reader, load_token_toxicity, read_lens_config
from loralens.lens.lenses.readout import LensMismatchError
from loralens.lens.runtime.lean import LeanLoadError, LeanModel, load_lean, parts_from_model
from loralens.lens.runtime.models import LoadedModel

HUB_PATTERNS = ["*.json", "*.safetensors", "*.md"]


def lens_folder(source: str | Path, revision: str | None = None) -> Path:
    """Return the local folder of `source`: itself when it is a folder, else a hub repository's snapshot.

    The hub is reached only here, when `source` is not a local folder and reads as a hub id "owner/name".
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ApiError(f"source: no lens folder at {text} (and it is not a hub id 'owner/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, no such repository, gated, ...: all mean "cannot get it"
        raise ApiError(f"source: '{text}' is not a local folder and not available from the Hugging Face hub "
                       f"({type(err).__name__})") from None


def _device_of(model: nn.Module) -> torch.device:
    """Return the device of a model's first parameter (cpu for a model without parameters)."""
    return next(iter(model.parameters()), torch.empty(0)).device  # host: a model without parameters


def _wrap_module(model: nn.Module, tokenizer: Any) -> LoadedModel:
    """Return a LoadedModel around a user's HF causal LM and its tokenizer (made ready for batched caching)."""
    from loralens.lens.runtime.adapters import adapter_for, model_dims
    from loralens.lens.runtime.models import prepare_tokenizer

    if tokenizer is None:
        raise ApiError("tokenizer: a HF model needs its tokenizer (or pass a model name or loralens.load_model(...))")
    prepare_tokenizer(tokenizer)
    name = str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, adapter=adapter_for(model.config.model_type),
                       dims=model_dims(model.config), path=name, fingerprint="")


def _model_spec(model: Any, tokenizer: Any, base: dict[str, Any]) -> tuple[ModelSpec, LoadedModel | None]:
    """Return how to load `model` (None: the saved `base` model) and the model itself when one was given built."""
    dtype_name = lambda m: str(m.dtype).removeprefix("torch.")  # noqa: E731
    if model is None:
        return ModelSpec(base["name"], base.get("dtype", "float32"), base.get("revision"),
                         base.get("trust_remote_code", False)), None
    if isinstance(model, (str, Path)):
        return ModelSpec(str(model), base.get("dtype", "float32")), None
    if isinstance(model, LoadedModel):
        return ModelSpec(model.path, dtype_name(model.model)), model
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        loaded = _wrap_module(model, tokenizer)
        return ModelSpec(loaded.path, dtype_name(model)), loaded
    raise ApiError(f"model: expected a model name, folder, hub id, loralens.load_model(...) or a HF model, got "
                   f"{type(model).__name__}")


def load_lenses(source: str | Path, model: str | Path | LoadedModel | nn.Module | None = None, *,
                tokenizer: Any = None, home: str | Path | None = None, device: str = "auto",
                revision: str | None = None) -> Lenses:
    """Return the lenses saved in `source` (a folder, or a hub id "owner/name" fetched at `revision`) on `model`.

    `model`: None (the base model named in config.json), a name (embedded alias, folder, hub id), a
    `loralens.load_model(...)` result (its checkpoint's frozen parts are read, as the pipeline reads them), or a
    HF causal LM with its `tokenizer` (its own weights are used). `home` converts embedded models (default
    $LORALENS_HOME or ./.loralens); `device` places the lenses of a named model ("auto": cuda when there is one).
    A model whose folded unembedding is not the one the lenses were trained on is refused with a one-line ApiError.
    """
    from loralens.lens.runtime.devices import resolve_device

    folder = lens_folder(source, revision)
    try:
        cfg = read_lens_config(folder)
    except LensFolderError as err:
        raise ApiError(str(err)) from None
    home_path = Path(home).expanduser().resolve() if home is not None else default_home()
    layers = cfg["layers"]
    spec, loaded = _model_spec(model, tokenizer, cfg["base_model"])
    try:
        if loaded is not None and not isinstance(model, LoadedModel):
            parts = parts_from_model(loaded.adapter, loaded.model, loaded.dims, layers)
            lean = LeanModel(parts, loaded.tokenizer, loaded.path, loaded.fingerprint)
        else:
            lean = load_lean(spec.name, home_path, layers, revision=spec.revision,
                             trust_remote_code=spec.trust_remote_code)
        reader = lens_reader(folder, cfg, lean)
    except (LensFolderError, LensMismatchError, LeanLoadError) as err:
        raise ApiError(str(err)) from None
    reader.to(_device_of(loaded.model) if loaded is not None else resolve_device(device))
    return Lenses(layers=layers, reader=reader, lean=lean, base=spec, store_dtype=cfg["store_dtype"],
                  vocab_tox=load_token_toxicity(folder, cfg), version=cfg.get("train_version"), home=None,
                  model_home=home_path, _model=loaded)


def export_lenses(out_dir: str | Path, home: str | Path | None = None, version: str | None = None) -> Path:
    """Write train version `version` (default: the newest complete one) of project `home` as a portable lens folder
    (see `Lenses.save_pretrained`); return the folder."""
    from loralens.api.home import open_home

    return open_home(home).lenses(version).save_pretrained(out_dir)
