"""`jigsaw-lstm`: the six-label Jigsaw BiLSTM from the PyPI package `toxic-comment-classifier==0.3.0`, in PyTorch.

The package ships Keras weights (`model/model.weights.h5`) and a pickled Keras `Tokenizer`, and needs TensorFlow to
run. We read both without TensorFlow or Keras and rebuild the network exactly as `toxic_classifier/model.py` does:

    ids [B, 100] (tokenizer.texts_to_sequences, pad_sequences(maxlen=100): pre-padding, pre-truncating, value 0)
    -> Embedding(20000, 50)            (no mask_zero: pads are real embedding-0 steps, so padding length matters)
    -> Bidirectional(LSTM(50, return_sequences=True))   (tanh / sigmoid, concat [forward, backward])
    -> GlobalMaxPooling1D -> Dense(50, relu) -> Dropout (identity at inference) -> Dense(6, sigmoid)

The package's `utils.clean_text` is never called by its classifier, so raw text goes straight to the tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loralens.hashing import file_sha256
from loralens.lens.evaluation.scorers import ScorerError, text_batches
from loralens.lens.evaluation.scorers.keras_tokenizer import (
    MAXLEN,
    KerasTokenizerLite,
    pad_sequences,
)

PACKAGE_MODULE = "toxic_classifier"  # top-level module of the PyPI distribution toxic-comment-classifier
PACKAGE_PIN = "toxic-comment-classifier==0.3.0"
LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
VOCAB_SIZE = 20000
EMBEDDING_DIM = 50
LSTM_UNITS = 50
DENSE_UNITS = 50
# Bump when anything here changes what scores come out for the same files.
CODE_VERSION = "1"


# HDF5 dataset paths in the Keras 3 `.weights.h5` layout.
_H5_KEYS = {
    "embedding": "layers/embedding/vars/0",
    "fw_kernel": "layers/bidirectional/forward_layer/cell/vars/0",
    "fw_recurrent": "layers/bidirectional/forward_layer/cell/vars/1",
    "fw_bias": "layers/bidirectional/forward_layer/cell/vars/2",
    "bw_kernel": "layers/bidirectional/backward_layer/cell/vars/0",
    "bw_recurrent": "layers/bidirectional/backward_layer/cell/vars/1",
    "bw_bias": "layers/bidirectional/backward_layer/cell/vars/2",
    "dense_kernel": "layers/dense/vars/0",
    "dense_bias": "layers/dense/vars/1",
    "out_kernel": "layers/dense_1/vars/0",
    "out_bias": "layers/dense_1/vars/1",
}
_EXPECTED_SHAPES = {
    "embedding": (VOCAB_SIZE, EMBEDDING_DIM),
    "fw_kernel": (EMBEDDING_DIM, 4 * LSTM_UNITS),
    "fw_recurrent": (LSTM_UNITS, 4 * LSTM_UNITS),
    "fw_bias": (4 * LSTM_UNITS,),
    "bw_kernel": (EMBEDDING_DIM, 4 * LSTM_UNITS),
    "bw_recurrent": (LSTM_UNITS, 4 * LSTM_UNITS),
    "bw_bias": (4 * LSTM_UNITS,),
    "dense_kernel": (2 * LSTM_UNITS, DENSE_UNITS),
    "dense_bias": (DENSE_UNITS,),
    "out_kernel": (DENSE_UNITS, len(LABELS)),
    "out_bias": (len(LABELS),),
}


# --------------------------------------------------------------------------------------------- package files


@dataclass(frozen=True)
class PackageFiles:
    """Where the weights and tokenizer of the installed package live."""

    weights: Path
    tokenizer: Path


def find_package_files(package_dir: Path | None = None) -> PackageFiles:
    """Return the weights/tokenizer paths of the installed package, located without importing it."""
    if package_dir is None:
        # find_spec on a top-level name does not execute it; importing it would import TensorFlow.
        spec = importlib.util.find_spec(PACKAGE_MODULE)
        if spec is None or not spec.submodule_search_locations:
            raise ScorerError(f"jigsaw-lstm needs the package: pip install --no-deps {PACKAGE_PIN} h5py")
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = PackageFiles(package_dir / "model" / "model.weights.h5", package_dir / "model" / "tokenizer.pickle")
    for path in (files.weights, files.tokenizer):
        if not path.is_file():
            raise ScorerError(f"jigsaw-lstm: missing {path}; reinstall with pip install --no-deps {PACKAGE_PIN}")
    return files


# --------------------------------------------------------------------------------------------- weights


def load_keras_weights(path: Path) -> dict[str, np.ndarray]:
    """Return the network's arrays (float32, Keras layout) read from a Keras 3 `.weights.h5` file."""
    try:
        import h5py
    except ImportError:
        raise ScorerError("jigsaw-lstm needs h5py to read the Keras weights: pip install h5py") from None
    try:
        with h5py.File(path, "r") as f:
            arrays = {k: np.asarray(f[key], dtype=np.float32) for k, key in _H5_KEYS.items() if key in f}
    except OSError as e:
        raise ScorerError(f"jigsaw-lstm: cannot read weights file {path}: {e}") from None
    missing = sorted(set(_H5_KEYS) - set(arrays))
    if missing:
        raise ScorerError(f"jigsaw-lstm: weights file {path} lacks {', '.join(_H5_KEYS[k] for k in missing)}")
    bad = [f"{k} {arrays[k].shape} != {shape}" for k, shape in _EXPECTED_SHAPES.items() if arrays[k].shape != shape]
    if bad:
        raise ScorerError(f"jigsaw-lstm: weights file {path} has unexpected shapes: {'; '.join(bad)}")
    return arrays


class JigsawLSTM(nn.Module):
    """The package's Keras network: embedding, BiLSTM, global max pool, relu dense, sigmoid dense."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, embedding_dim: int = EMBEDDING_DIM,
                 lstm_units: int = LSTM_UNITS, dense_units: int = DENSE_UNITS, n_labels: int = len(LABELS)):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, lstm_units, batch_first=True, bidirectional=True)
        self.dense = nn.Linear(2 * lstm_units, dense_units)
        self.out = nn.Linear(dense_units, n_labels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Return label probabilities [B, n_labels] for padded token ids [B, T]."""
        hidden, _ = self.lstm(self.embedding(ids))
        pooled = hidden.amax(dim=1)
        return torch.sigmoid(self.out(torch.relu(self.dense(pooled))))

    @classmethod
    def from_keras_arrays(cls, arrays: dict[str, np.ndarray]) -> JigsawLSTM:
        """Return the network with the Keras arrays copied in, in eval mode."""
        model = cls()
        state = {
            "embedding.weight": arrays["embedding"],
            "dense.weight": arrays["dense_kernel"].T,
            "dense.bias": arrays["dense_bias"],
            "out.weight": arrays["out_kernel"].T,
            "out.bias": arrays["out_bias"],
        }
        # Keras gates (i, f, c, o) match PyTorch's (i, f, g, o); Keras kernels are [in, 4h], PyTorch's [4h, in].
        # Keras has one bias; PyTorch adds bias_ih + bias_hh, so the second one is zero.
        for prefix, suffix in (("fw", ""), ("bw", "_reverse")):
            state[f"lstm.weight_ih_l0{suffix}"] = arrays[f"{prefix}_kernel"].T
            state[f"lstm.weight_hh_l0{suffix}"] = arrays[f"{prefix}_recurrent"].T
            state[f"lstm.bias_ih_l0{suffix}"] = arrays[f"{prefix}_bias"]
            state[f"lstm.bias_hh_l0{suffix}"] = np.zeros_like(arrays[f"{prefix}_bias"])
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
        return model.eval()


# --------------------------------------------------------------------------------------------- scorer


def scorer_version(files: PackageFiles) -> str:
    """Return "jigsaw-lstm/<code version>-<16 hex>": a hash of the weights and tokenizer bytes and the code version."""
    digest = hashlib.sha256(f"{CODE_VERSION}:{file_sha256(files.weights)}:{file_sha256(files.tokenizer)}".encode())
    return f"jigsaw-lstm/{CODE_VERSION}-{digest.hexdigest()[:16]}"


def version_for(package_dir: Path | str | None = None) -> str:
    """Return the version JigsawLSTMScorer(package_dir) would have, without loading the weights."""
    return scorer_version(find_package_files(Path(package_dir) if package_dir is not None else None))


class JigsawLSTMScorer:
    """The `jigsaw-lstm` toxicity scorer: CPU, eval mode, no grad, batched."""

    name = "jigsaw-lstm"
    labels = LABELS

    def __init__(self, package_dir: Path | str | None = None):
        files = find_package_files(Path(package_dir) if package_dir is not None else None)
        self.files = files
        self.model = JigsawLSTM.from_keras_arrays(load_keras_weights(files.weights))
        self.tokenizer = KerasTokenizerLite.from_pickle(files.tokenizer)
        self.version = scorer_version(files)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return the padded int64 [N, 100] token ids the package would feed its model."""
        return pad_sequences(self.tokenizer.texts_to_sequences(texts), maxlen=MAXLEN)

    @torch.inference_mode()
    def predict_ids(self, ids: np.ndarray) -> np.ndarray:
        """Return float32 [N, 6] probabilities for padded token ids."""
        return self.model(torch.from_numpy(ids)).numpy().astype(np.float32)  # host: a small CPU classifier

    def score(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
        """Return per-label probabilities, each float32 of shape [len(texts)]."""
        batches = text_batches(texts, batch_size, progress=progress, desc=self.name)
        probs = np.zeros((len(texts), len(LABELS)), dtype=np.float32)
        for start, batch in batches:
            probs[start:start + len(batch)] = self.predict_ids(self.encode(batch))
        return {label: probs[:, j].copy() for j, label in enumerate(LABELS)}
