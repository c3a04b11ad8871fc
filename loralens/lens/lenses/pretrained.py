"""Portable lenses: every layer's bank of one lens set in one flat folder (a Hugging Face hub repository can hold it).

Layout::

    out_dir/config.json                   format, loralens version, base model, unembedding fingerprint,
                                          lens config (form, rank, alpha, dtype, objective), layers, sizes
    out_dir/lenses.layer_05.safetensors   one layer's bank: its trainable tensors (as `save_bank` writes them)
    out_dir/token_toxicity.safetensors    optional: `[V]` token toxicity the lenses' readouts use

The frozen folded unembedding `W_fold = W_U diag(norm)` is not saved: the model brings it, and its fingerprint
(:func:`fingerprint_tensor`, the one every saved bank carries) must equal the one the lenses were trained on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loralens.lens.lenses.lens_set import FoldedUnembed, LensBank
from loralens.lens.lenses.peft_io import bank_from_tensors, bank_tensors
from loralens.lens.lenses.readout import HeadReader, LensMismatchError
from loralens.lens.runtime.lean import LeanModel

FORMAT = "loralens-lenses"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TOXICITY_FILE = "token_toxicity.safetensors"
REQUIRED = ("base_model", "unembedding_fingerprint", "lens", "layers", "n_heads", "store_dtype")


class LensFolderError(ValueError):
    """A folder that is not a readable saved lens set (no config.json, another format, a missing file)."""


def layer_file(layer: int) -> str:
    """Return the file name of one layer's bank."""
    return f"lenses.layer_{layer:02d}.safetensors"


def write_lenses(out_dir: str | Path, banks: Mapping[int, LensBank], info: dict[str, Any],
                 token_toxicity: torch.Tensor | None = None) -> Path:
    """Write `banks` (layer -> bank, one shared unembedding and config) to `out_dir`; return the folder.

    `info` (JSON-serialisable: base model, version, ...) is written into config.json beside the lens fields.
    `token_toxicity` `[V]` is written when given. Bank files of layers no longer saved are removed.
    """
    if not banks:
        raise LensFolderError("no lens banks to save")
    layers = sorted(banks)
    first = banks[layers[0]]
    for layer in layers:
        bank = banks[layer]
        if bank.config != first.config or bank.unembed.fingerprint() != first.unembed.fingerprint():
            raise LensFolderError(f"layer {layer}'s bank has another config or unembedding than layer {layers[0]}'s")
    out = Path(out_dir).expanduser()
    if (out / CONFIG_FILE).exists():  # never overwrite another config.json (a model folder's)
        try:
            read_lens_config(out)
        except LensFolderError:
            raise LensFolderError(f"{out / CONFIG_FILE} exists and is not a saved lens config; refusing to overwrite "
                                  "it (choose another folder)") from None
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = first.unembed.fingerprint()
    for stale in out.glob("lenses.layer_*.safetensors"):
        stale.unlink()
    for layer in layers:
        save_file(bank_tensors(banks[layer]), str(out / layer_file(layer)),
                  metadata={"format": FORMAT, "fingerprint": fingerprint, "layer": str(layer)})
    (out / TOXICITY_FILE).unlink(missing_ok=True)
    if token_toxicity is not None:
        if tuple(token_toxicity.shape) != (first.vocab,):
            raise LensFolderError(f"token toxicity must be [{first.vocab}], got {tuple(token_toxicity.shape)}")
        save_file({"score": token_toxicity.detach().to("cpu", torch.float32).contiguous()},  # host: written to disk
              str(out / TOXICITY_FILE))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **info, "unembedding_fingerprint": fingerprint,
              "lens": first.config.to_dict(), "layers": layers, "n_heads": first.n_heads, "d_model": first.d_model,
              "vocab": first.vocab, "files": [layer_file(layer) for layer in layers],
              "token_toxicity": TOXICITY_FILE if token_toxicity is not None else None}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_lens_config(folder: str | Path) -> dict[str, Any]:
    """Return the config.json of a saved lens folder; LensFolderError (one line) if it is not one."""
    path = Path(folder) / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise LensFolderError(f"{folder} is not a saved lens folder: it has no {CONFIG_FILE}") from None
    except (OSError, ValueError) as err:
        raise LensFolderError(f"{path} is unreadable: {str(err).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise LensFolderError(f"{path} is not a loralens lens config (its format is not '{FORMAT}')")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise LensFolderError(f"{path} has format_version {cfg.get('format_version')}; this loralens reads "
                              f"{FORMAT_VERSION} (a newer loralens wrote it?)")
    missing = [key for key in REQUIRED if key not in cfg]
    if missing:
        raise LensFolderError(f"{path} lacks {', '.join(missing)}")
    return cfg


def check_unembedding(cfg: dict[str, Any], unembed: FoldedUnembed, model: str) -> None:
    """Raise LensMismatchError (one line) unless `unembed` is the folded unembedding the lenses were trained on."""
    have, want = unembed.fingerprint(), cfg["unembedding_fingerprint"]
    if have != want:
        raise LensMismatchError(
            f"these lenses were trained on '{cfg['base_model']['name']}' (unembedding fingerprint {want}), but model "
            f"'{model}' has unembedding fingerprint {have} (another model, or its weights in another dtype)")


def load_token_toxicity(folder: str | Path, cfg: dict[str, Any]) -> torch.Tensor | None:
    """Return the saved `[V]` token toxicity, or None when the folder has none."""
    if not cfg.get("token_toxicity"):
        return None
    return load_file(str(Path(folder) / cfg["token_toxicity"]), device="cpu")["score"]  # host: read from disk


def lens_reader(folder: str | Path, cfg: dict[str, Any], lean: LeanModel) -> HeadReader:
    """Return a HeadReader of the saved banks on `lean`'s frozen parts, after the fingerprint check."""
    dims = lean.dims
    unembed = FoldedUnembed(*lean.parts.folded())
    check_unembedding(cfg, unembed, lean.path)
    if cfg["n_heads"] != dims.n_heads:
        raise LensMismatchError(f"these lenses have {cfg['n_heads']} heads per layer, model {lean.path} has "
                                f"{dims.n_heads}")
    banks, w_o = {}, {}
    for layer in cfg["layers"]:
        path = Path(folder) / layer_file(layer)
        if not path.exists():
            raise LensFolderError(f"{folder} lacks {path.name}, the bank of layer {layer}")
        try:
            bank = bank_from_tensors({**cfg["lens"], "n_heads": cfg["n_heads"], "layer": layer},
                                     load_file(str(path), device="cpu"), unembed)  # host: read, then moved
        except Exception as err:  # noqa: BLE001 - a truncated safetensors file raises its own error type
            raise LensFolderError(f"{path} is unreadable: {str(err).splitlines()[0] or type(err).__name__}") from None
        banks[layer] = bank.eval()
        w_o[layer] = lean.parts.w_o(layer)
    return HeadReader(unembed=unembed, w_o=w_o, banks=banks)
