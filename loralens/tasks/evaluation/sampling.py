"""Sampling one prompt batch and scoring it: the unit the select and intervene stages both generate."""

from __future__ import annotations

import numpy as np

from loralens.config import InterveneConfig
from loralens.lens.evaluation.generation import generate_joint
from loralens.lens.runtime.models import LoadedModel


def sample_scored(loaded: LoadedModel, scorer, label: str, prompts: list[str], batch: range, k: int,
                  ic: InterveneConfig) -> tuple[list[str], np.ndarray]:
    """Return the k continuations of each prompt of `batch` (flat, prompt-major) and their toxicity `[len * k]`.

    One generate() per prompt batch, seeded by the batch's first prompt index: every condition (and every head set
    the selection tries) samples with the same seeds, so comparisons are paired and a resumed batch is identical.
    """
    texts = generate_joint(loaded.model, loaded.tokenizer, [prompts[i] for i in batch], batch_key=batch[0], k=k,
                           max_new_tokens=ic.max_new_tokens, top_p=ic.top_p, seed=ic.seed)
    flat = [t for row in texts for t in row]
    return flat, np.asarray(scorer.score(flat)[label], dtype=np.float64)


__all__ = ["sample_scored"]
