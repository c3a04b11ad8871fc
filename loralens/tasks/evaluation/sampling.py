"""Sampling one prompt batch and scoring it: the unit the select and intervene stages both generate.

A batch's size (`intervene.batch_prompts`) never changes a sample, so it is not part of a version; it does cut the
intervene stage's resumable units, so a version keeps the size its first run started with (`unit_batch_prompts`).
"""

from __future__ import annotations

import json

import numpy as np

from loralens.config import InterveneConfig
from loralens.lens.evaluation.generation import generate_joint, sample_seed
from loralens.lens.runtime.models import LoadedModel
from loralens.warehouse.artifacts import ArtifactDir, atomic_write_bytes

# In an intervene version's folder: the prompts per generation unit its shards were cut by.
UNIT_LAYOUT = "generation_units.json"


def batch_seeds(prompts: list[str], batch: range, k: int, seed: int) -> list[int]:
    """Return the sampling seed of each continuation of `batch` (flat, prompt-major) `[len(batch) * k]`."""
    return [sample_seed(seed, prompts[i], j) for i in batch for j in range(k)]


def sample_scored(loaded: LoadedModel, scorer, label: str, prompts: list[str], batch: range, k: int,
                  ic: InterveneConfig) -> tuple[list[str], np.ndarray]:
    """Return the k continuations of each prompt of `batch` (flat, prompt-major) and their toxicity `[len * k]`.

    Sample j of a prompt is seeded by (intervene.seed, the prompt's text, j) alone: every condition (and every head
    set the selection tries) samples a prompt with the same seeds, so comparisons are paired, and the texts do not
    depend on the batch size, the batch or the worker. Each prompt's k continuations are scored as one scorer batch
    (a scorer's numbers move in the last digits with its batch's other texts), so neither do the scores.
    """
    texts = generate_joint(loaded.model, loaded.tokenizer, [prompts[i] for i in batch], k=k,
                           max_new_tokens=ic.max_new_tokens, top_p=ic.top_p, seed=ic.seed)
    scores = [np.asarray(scorer.score(row)[label], dtype=np.float64) for row in texts]  # [k] per prompt
    return [t for row in texts for t in row], np.concatenate(scores)


def unit_batch_prompts(adir: ArtifactDir, configured: int) -> int:
    """Return the prompts per generation unit of a version: the size its folder was started with, else `configured`.

    A run resumed (or a worker joining) with another `intervene.batch_prompts` keeps the first run's units, so its
    done shards still mean the same prompts; the samples are the same either way.
    """
    try:
        return int(json.loads((adir.path / UNIT_LAYOUT).read_text())["batch_prompts"])
    except FileNotFoundError:
        return configured


def record_unit_batch_prompts(adir: ArtifactDir, batch_prompts: int) -> None:
    """Record the prompts per generation unit in a prepared version folder that has no record yet."""
    if not (adir.path / UNIT_LAYOUT).exists():
        atomic_write_bytes(adir.path / UNIT_LAYOUT, json.dumps({"batch_prompts": batch_prompts}).encode())


__all__ = ["UNIT_LAYOUT", "batch_seeds", "record_unit_batch_prompts", "sample_scored", "unit_batch_prompts"]
