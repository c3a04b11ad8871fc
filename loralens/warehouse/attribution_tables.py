"""Warehouse rows of the attribute stage (vocabulary toxicity, prompt groups, head scores) and of prompts.

The `vocab_toxicity` rows are built from the decode version's token toxicity file (the one vocabulary toxicity)
with the attribute version's lexicon and token threshold applied; the attribute stage writes no copy of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from loralens.warehouse.db import replace_version_rows


def prompts_rows(cache_version: str, prompts: pa.Table) -> pa.Table:
    """Return the cache's prompt metadata as `prompts` table rows."""
    return prompts.append_column("version", pa.array([cache_version] * prompts.num_rows, pa.string()))


def register_prompts(db: Path, cache_version: str, prompts: pa.Table) -> None:
    """Replace the `prompts` rows of a cache version in one transaction."""
    replace_version_rows(db, cache_version, {"prompts": prompts_rows(cache_version, prompts)})


def head_scores_table(version: str, layers: list[int], scores: dict[str, np.ndarray],
                      ranks: dict[str, np.ndarray]) -> pa.Table:
    """Return `head_scores` rows: scores/ranks are `[L, H]` arrays per method, rows of `layers`."""
    cols: dict[str, list] = {"layer": [], "head": [], "method": [], "score": [], "rank": []}
    for method, s in scores.items():
        n_layers, n_heads = s.shape
        cols["layer"] += np.repeat(np.asarray(layers), n_heads).tolist()
        cols["head"] += np.tile(np.arange(n_heads), n_layers).tolist()
        cols["method"] += [method] * s.size
        cols["score"] += s.astype(np.float64).ravel().tolist()
        cols["rank"] += ranks[method].ravel().tolist()
    n = len(cols["layer"])
    return pa.table({"version": [version] * n, "layer": pa.array(cols["layer"], pa.int32()),
                     "head": pa.array(cols["head"], pa.int32()), "method": cols["method"],
                     "score": pa.array(cols["score"], pa.float64()), "rank": pa.array(cols["rank"], pa.int32())})


def vocab_table(version: str, token_toxicity: pa.Table, in_lexicon: np.ndarray, toxic: np.ndarray) -> pa.Table:
    """Return `vocab_toxicity` rows, one per token id: the decode version's token toxicity rows (token_id, token,
    kind, score) with the attribute version's `in_lexicon` and `toxic` `[V]` bool columns."""
    n = token_toxicity.num_rows
    return pa.table({"version": pa.array([version] * n, pa.string()),
                     **{c: token_toxicity.column(c) for c in ("token_id", "token", "kind", "score")},
                     "in_lexicon": pa.array(in_lexicon, pa.bool_()), "toxic": pa.array(toxic, pa.bool_())})


def token_flags_table(in_lexicon: np.ndarray, toxic: np.ndarray) -> pa.Table:
    """Return the attribute version's per-token flags `[V]` (token_id, in_lexicon, toxic): what its lexicon and
    token threshold made of decode's token toxicity, so its `vocab_toxicity` rows can be rebuilt from files."""
    return pa.table({"token_id": pa.array(np.arange(len(toxic)), pa.int32()),
                     "in_lexicon": pa.array(in_lexicon, pa.bool_()), "toxic": pa.array(toxic, pa.bool_())})


def prompt_groups_table(version: str, prompt_idx: np.ndarray, toxicity: np.ndarray, origin: list[str],
                        toxic: np.ndarray) -> pa.Table:
    """Return `prompt_groups` rows."""
    n = len(prompt_idx)
    return pa.table({"version": [version] * n, "prompt_idx": pa.array(prompt_idx, pa.int32()),
                     "toxicity": pa.array(toxicity, pa.float64()), "origin": origin, "toxic": pa.array(toxic)})


def store_attribution(db: Path, version: str, vocab: pa.Table, groups: pa.Table, scores: pa.Table) -> None:
    """Replace an attribute version's rows in all three tables in ONE transaction."""
    replace_version_rows(db, version, {"vocab_toxicity": vocab, "prompt_groups": groups, "head_scores": scores})
