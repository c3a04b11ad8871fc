"""Toxicity scorers: a shared interface and a name -> scorer registry.

Scorers are imported lazily so that asking for one never pulls in the heavy dependencies of another.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np


class ScorerError(ValueError):
    """A scorer cannot be built: missing package, bad weights or tokenizer file (one-line message)."""


@runtime_checkable
class ToxicityScorer(Protocol):
    """What every toxicity scorer offers."""

    name: str
    labels: tuple[str, ...]
    version: str  # content hash of weights + tokenizer + scorer code version; part of every score's version

    def score(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
        """Return per-label probabilities, each float32 of shape [len(texts)]."""
        ...


# name -> (module, class); modules are imported only when their scorer is requested.
_REGISTRY: dict[str, tuple[str, str]] = {
    "jigsaw-lstm": ("loralens.lens.evaluation.scorers.jigsaw_lstm", "JigsawLSTMScorer"),
    "detoxify": ("loralens.lens.evaluation.scorers.detoxify_scorer", "DetoxifyScorer"),
}

# Labels that mean "overall toxicity", in preference order.
_PRIMARY_LABELS = ("toxicity", "toxic")


def text_batches(
    texts: Sequence[str], batch_size: int, *, progress: bool = False, desc: str = "score"
) -> Iterator[tuple[int, list[str]]]:
    """Return an iterator of (start index, batch of texts), with a progress bar when asked.

    The arguments are checked now, not at the first iteration.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    return ((start, texts[start : start + batch_size]) for start in starts)


def known_scorers() -> tuple[str, ...]:
    """Return the registered scorer names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_scorer(name: str, **kwargs) -> ToxicityScorer:
    """Return a freshly built scorer registered under `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(known_scorers())}")
    module_name, class_name = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ValueError(f"scorer {name!r} is not available: module {module_name} does not exist") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"scorer {name!r} is not available: {module_name} defines no {class_name}")
    return cls(**kwargs)


def scorer_version(name: str, **kwargs) -> str:
    """Return the version a scorer would report, from its files' content hashes, without loading its model."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(known_scorers())}")
    module = importlib.import_module(_REGISTRY[name][0])
    return module.version_for(**kwargs)


def primary_label(scorer: ToxicityScorer) -> str:
    """Return the scorer's label that stands for overall toxicity ("toxicity" or "toxic")."""
    for label in _PRIMARY_LABELS:
        if label in scorer.labels:
            return label
    raise ScorerError(f"scorer {scorer.name!r} has no overall toxicity label among {scorer.labels}")


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the ROC AUC of `scores` for binary `labels` (Mann-Whitney U, ties get average ranks)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average 1-based ranks over runs of equal scores so ties count half.
    run_starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    run_ends = np.r_[run_starts[1:], len(s)]
    for a, b in zip(run_starts, run_ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


__all__ = ["ScorerError", "ToxicityScorer", "get_scorer", "known_scorers", "primary_label", "scorer_version", "roc_auc"]
