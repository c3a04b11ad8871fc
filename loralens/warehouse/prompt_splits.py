"""The three prompt splits, pairwise disjoint by prompt text, and their warehouse rows.

- corpus: the cache corpus (`corpus.paths`: lenses are trained on it, heads decoded and scored on it by attribute);
- selection: challenging prompts the select stage scores heads on and chooses a head set with;
- evaluation: challenging prompts the intervene stage measures every condition on.

A challenging prompt's split is a function of its text alone (sha256, so the same in every process and run): it is
in the selection split when the hash's fraction is below `selection_share`. Adding or removing other prompts, or
reordering the file, never moves a prompt to the other split. A prompt whose text is in the cache corpus is in
neither (with `held_out`), and a text repeated in the file counts once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa

from loralens.warehouse.corpus import Prompt

SPLITS = ("corpus", "selection", "evaluation")


def text_fraction(text: str) -> float:
    """Return a stable number in [0, 1) from the prompt text (the first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class Splits:
    """The prompts of each split, in corpus order (`evaluation[i]` is the intervene stage's prompt_idx i)."""

    corpus: tuple[Prompt, ...]
    selection: tuple[Prompt, ...]
    evaluation: tuple[Prompt, ...]

    def of(self, name: str) -> tuple[Prompt, ...]:
        """Return one split's prompts by name."""
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {name!r}")
        return getattr(self, name)


def split_challenging(challenging: list[Prompt], corpus: list[Prompt], selection_share: float, *,
                      max_selection: int, max_evaluation: int, held_out: bool = True) -> Splits:
    """Return the splits: the cache `corpus` itself, and the challenging prompts not in it (by text, with
    `held_out`), each text once, assigned by `text_fraction`, then cut to the first `max_selection` /
    `max_evaluation` of each."""
    seen = {p.text for p in corpus} if held_out else set()
    selection: list[Prompt] = []
    evaluation: list[Prompt] = []
    for p in challenging:
        if p.text in seen:
            continue
        seen.add(p.text)
        (selection if text_fraction(p.text) < selection_share else evaluation).append(p)
    return Splits(tuple(corpus), tuple(selection[:max_selection]), tuple(evaluation[:max_evaluation]))


def splits_table(version: str, splits: Splits) -> pa.Table:
    """Return `prompt_splits` rows: every prompt of every split with its index within the split."""
    rows = [(name, i, p) for name in SPLITS for i, p in enumerate(splits.of(name))]
    return pa.table({
        "version": pa.array([version] * len(rows), pa.string()),
        "split": pa.array([name for name, _, _ in rows], pa.string()),
        "prompt_idx": pa.array([i for _, i, _ in rows], pa.int32()),
        "prompt_id": pa.array([p.id for _, _, p in rows], pa.string()),
        "text": pa.array([p.text for _, _, p in rows], pa.string()),
        "toxicity": pa.array([p.toxicity for _, _, p in rows], pa.float64()),
        "continuation": pa.array([p.continuation for _, _, p in rows], pa.string()),
    })


__all__ = ["SPLITS", "Splits", "split_challenging", "splits_table", "text_fraction"]
