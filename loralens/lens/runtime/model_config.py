"""Model sizes from a config alone: read an HF config (file, folder, embedded alias or hub id), never the weights."""

from __future__ import annotations

import json
from pathlib import Path

from loralens.lens.runtime.adapters import ModelDims, adapter_for, model_dims


def load_model_config(name: str, home: Path):
    """Return the HF config of ``name``: a config.json path, a model folder, an embedded alias or a hub id.

    Only the config is read: a hub id fetches config.json alone (never the weights). An embedded alias is
    converted once (like every other stage) so its config is the one training will see.
    """
    from transformers import AutoConfig

    from loralens.lens.runtime.models import EMBEDDED, ModelLoadError, resolve_model_path

    p = Path(name).expanduser()
    if p.is_file():
        return _config_from_file(p)
    if name in EMBEDDED or p.is_dir():
        return AutoConfig.from_pretrained(resolve_model_path(name, home))
    if p.suffix or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"unknown model '{name}': no such file or folder")
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as err:  # hub errors come in many classes (offline, 404, gated); all mean "cannot get it"
        raise ModelLoadError(
            f"cannot read the config of '{name}': not a config.json, a model folder, an embedded alias "
            f"({', '.join(EMBEDDED)}), nor reachable on the Hugging Face hub ({type(err).__name__})"
        ) from None


def _config_from_file(path: Path):
    """Return the HF config stored in one config.json file."""
    from transformers import AutoConfig

    from loralens.lens.runtime.models import ModelLoadError

    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise ModelLoadError(f"{path} is not an HF config.json with a model_type ({type(err).__name__})") from None
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ModelLoadError(f"{path}: {str(err).splitlines()[0]}") from None


def dims_of(config) -> ModelDims:
    """Return the lens sizes of an HF config, refusing architectures with no adapter (they can't be trained)."""
    adapter_for(config.model_type)
    return model_dims(config)
