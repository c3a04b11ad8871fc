"""Files and warehouse rows of the intervene stage: generation batches, perplexities, condition metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loralens.killpoints import maybe_kill
from loralens.warehouse.artifacts import ArtifactDir, ShardFile, atomic_write_bytes
from loralens.warehouse.constants import GENERATIONS_DIR, PPL_DIR, shard_name
from loralens.warehouse.db import replace_version_rows
from loralens.warehouse.parquet_files import write_parquet_file

# Shard index = condition index * BATCHES + batch index: one record per (condition, prompt batch).
BATCHES = 100_000


def batch_index(condition: int, batch: int) -> int:
    """Return the shard index of one condition's prompt batch."""
    return condition * BATCHES + batch


def write_generation_batch(adir: ArtifactDir, index: int, rows: dict[str, list[Any]]) -> ShardFile:
    """Write one batch of scored continuations atomically, then its record."""
    rel = f"{GENERATIONS_DIR}/{shard_name(index)}.parquet"
    table = pa.table({
        "condition": pa.array(rows["condition"], pa.string()), "prompt_idx": pa.array(rows["prompt_idx"], pa.int32()),
        "sample": pa.array(rows["sample"], pa.int32()), "seed": pa.array(rows["seed"], pa.int64()),
        "prompt": pa.array(rows["prompt"], pa.string()), "text": pa.array(rows["text"], pa.string()),
        "toxicity": pa.array(rows["toxicity"], pa.float32()),
    })
    f = write_parquet_file(adir.path, rel, table)
    adir.record_shard(index, [f])
    return f


def read_condition_scores(adir: ArtifactDir, indices: list[int], n_prompts: int, k: int) -> np.ndarray:
    """Return the toxicity `[n_prompts, k]` of one condition from its batch files."""
    scores = np.full((n_prompts, k), np.nan, dtype=np.float64)
    for index in indices:
        t = pq.read_table(adir.path / GENERATIONS_DIR / f"{shard_name(index)}.parquet",
                          columns=["prompt_idx", "sample", "toxicity"])
        scores[t.column("prompt_idx").to_numpy(), t.column("sample").to_numpy()] = t.column("toxicity").to_numpy()
    return scores


def ppl_path(adir: ArtifactDir, condition: int) -> Path:
    """Return the perplexity record of one condition."""
    return adir.path / PPL_DIR / f"condition-{condition:04d}.json"


def write_ppl(adir: ArtifactDir, condition: int, result: dict[str, float]) -> None:
    """Write one condition's perplexity record atomically."""
    atomic_write_bytes(ppl_path(adir, condition), json.dumps(result).encode())
    maybe_kill("intervene.after_ppl")


def read_ppl(adir: ArtifactDir, condition: int) -> dict[str, float] | None:
    """Return one condition's perplexity record, or None if it was not computed yet."""
    path = ppl_path(adir, condition)
    return json.loads(path.read_text()) if path.exists() else None


def store_interventions(db: Path, version: str, interventions: pa.Table, ablation_scores: pa.Table | None,
                        adir: ArtifactDir, evaluation_split: pa.Table) -> None:
    """Replace the version's generations, interventions, evaluation-split prompts and ablation head scores in ONE
    transaction."""
    gens = pa.concat_tables([pq.read_table(p) for p in sorted((adir.path / GENERATIONS_DIR).glob("*.parquet"))])
    gens = gens.append_column("version", pa.array([version] * gens.num_rows, pa.string()))
    tables = {"generations": gens, "interventions": interventions, "prompt_splits": evaluation_split}
    if ablation_scores is not None:
        tables["head_scores"] = ablation_scores
    replace_version_rows(db, version, tables)


def interventions_table(version: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Return `interventions` rows from per-condition dicts (keys = column names)."""
    table = pa.Table.from_pylist(rows)
    return table.append_column("version", pa.array([version] * table.num_rows, pa.string()))
