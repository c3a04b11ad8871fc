"""Load a frozen Hugging Face causal LM the way the pipeline does (device and dtype policy)."""

from __future__ import annotations

from pathlib import Path

from loralens.defaults import default_home
from loralens.lens.runtime.models import LoadedModel
from loralens.lens.runtime.models import load_model as _load_model


def load_model(name: str, home: str | Path | None = None, *, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False) -> LoadedModel:
    """Return a frozen HF causal LM with `.model`, `.tokenizer`, `.adapter`, `.dims` (embedded alias, folder, hub id).

    `home` holds converted embedded models (default $LORALENS_HOME or ./.loralens). `device` and `dtype` follow
    the pipeline's policy (`model.device`, `model.dtype`): auto = cuda and bfloat16 when a GPU is there, else
    cpu and float32.
    """
    from loralens.lens.runtime.devices import resolve_device, resolve_dtype

    home = Path(home).resolve() if home is not None else default_home()
    where = resolve_device(device)
    return _load_model(name, home, dtype=resolve_dtype(dtype, where), device=where,
                       trust_remote_code=trust_remote_code)
