"""Detoxify toxicity scorer loaded fully offline from a local checkpoint file and a local Hugging Face folder."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator, Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralens.hashing import file_sha256

# Keys that detoxify's load_checkpoint/get_model_and_tokenizer read from a checkpoint's "config".
_ARCH_KEYS = ("model_type", "model_name", "tokenizer_name", "num_classes")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Yield with the Hugging Face hub forced offline, restoring the previous setting afterwards."""
    import huggingface_hub.constants as hub_constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import, so setting the env var alone is too late once it is
    # imported; its is_offline_mode() reads this module global at call time.
    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_const = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def load_detoxify_checkpoint(path: Path, *, weights_only: bool = True) -> dict[str, Any]:
    """Return a detoxify checkpoint dict (``config`` + ``state_dict``) loaded on CPU, validated."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"detoxify checkpoint {path} holds pickled objects that weights_only loading refuses ({first}); "
            "pass weights_only=False only if you trust the file"
        ) from exc
    if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
        raise ValueError(f"detoxify checkpoint {path} must be a dict with 'config' and 'state_dict'")
    try:
        args = loaded["config"]["arch"]["args"]
        classes = loaded["config"]["dataset"]["args"]["classes"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"detoxify checkpoint {path} lacks config.arch.args or config.dataset.args.classes") from exc
    missing = [k for k in _ARCH_KEYS if k not in args]
    if missing:
        raise ValueError(f"detoxify checkpoint {path} config.arch.args lacks {missing}")
    if len(classes) != int(args["num_classes"]):
        raise ValueError(f"detoxify checkpoint {path} has {len(classes)} classes but num_classes={args['num_classes']}")
    return loaded


def version_for(checkpoint: str | Path, hf_folder: str | Path | None = None, **_: object) -> str:
    """Return the version DetoxifyScorer(checkpoint, ...) would have, without loading the model."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"detoxify checkpoint file not found: {path}")
    return f"{file_sha256(path)[:16]}-detoxify{package_version('detoxify')}"


class DetoxifyScorer:
    """Multi-label toxicity scores from a local detoxify checkpoint, run through detoxify's own ``Detoxify`` class."""

    name = "detoxify"

    def __init__(
        self,
        checkpoint: str | Path,
        hf_folder: str | Path,
        device: str | torch.device = "cpu",
        *,
        weights_only: bool = True,
    ) -> None:
        from detoxify import Detoxify
        from transformers import AutoConfig

        ckpt_path = Path(checkpoint)
        folder = Path(hf_folder)
        if not ckpt_path.is_file():
            raise ValueError(f"detoxify checkpoint file not found: {ckpt_path}")
        if not (folder / "config.json").is_file():
            raise ValueError(f"Hugging Face config not found: {folder / 'config.json'}")

        loaded = load_detoxify_checkpoint(ckpt_path, weights_only=weights_only)
        args = loaded["config"]["arch"]["args"]
        # detoxify always calls config_class.from_pretrained(model_type) and, without huggingface_config_path,
        # tokenizer.from_pretrained(model_type): pointing model_type at the folder keeps both off the hub.
        args["model_type"] = str(folder)
        num_classes = int(args["num_classes"])

        with hub_offline():
            folder_labels = AutoConfig.from_pretrained(folder, local_files_only=True).num_labels
            # With huggingface_config_path detoxify loads the model config from the folder as-is, without its
            # num_labels override, so only pass it when the folder already agrees with the checkpoint; otherwise
            # the rewritten model_type still loads everything from the folder, with num_labels applied.
            config_path = str(folder) if folder_labels == num_classes else None
            # detoxify's loader calls torch.load(weights_only=False); handing it bytes we re-serialised from a
            # (by default) weights_only load means it only ever unpickles plain containers and tensors.
            buffer = io.BytesIO()
            torch.save(loaded, buffer)
            del loaded
            buffer.seek(0)
            self._detoxify = Detoxify(checkpoint=buffer, device=device, huggingface_config_path=config_path)

        self.labels: tuple[str, ...] = tuple(self._detoxify.class_names)
        self.version = version_for(ckpt_path)
        self.checkpoint = ckpt_path
        self.hf_folder = folder

    def score(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> dict[str, np.ndarray]:
        """Return {label: float32 array of per-text probabilities in [0, 1]}, in input order."""
        from loralens.lens.evaluation.scorers import text_batches

        parts: dict[str, list[np.ndarray]] = {label: [] for label in self.labels}
        for _, batch in text_batches(texts, batch_size, progress=progress, desc=self.name):
            result = self._detoxify.predict(batch)
            for label in self.labels:
                # predict() squeezes a one-text batch down to a bare float
                parts[label].append(np.atleast_1d(np.asarray(result[label], dtype=np.float32)))
        empty = np.zeros(0, dtype=np.float32)
        return {label: np.concatenate(chunks) if chunks else empty.copy() for label, chunks in parts.items()}
