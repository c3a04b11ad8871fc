"""Parquet layout of the activation cache, shard writer and readers.

    cache/<version>/
      prompts/shard-00000.parquet          prompt metadata (id, source, text, toxicity, n_tokens, truncated)
      tokens/shard-00000.parquet           per token: ids, positions, target (h_final, scale, top-k, lse)
      z/layer=7/shard-00000.parquet      per token: that layer's output-projection input z
      _shards/shard-00000.json             files, rows and sha256 of a finished shard
      manifest.json                        written last

Rows of `tokens` and of every `z/layer=*` file of one shard are in the same order (column `row`).
Tensors are stored as fixed-size binary (raw little-endian fp16/bf16/fp32 bits): compact, readable by
DuckDB, and decoded with zero copies by numpy. One layer can be read alone (hive partition `layer`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loralens.warehouse.artifacts import ArtifactDir, ShardFile
from loralens.warehouse.constants import (
    CACHE_PROMPTS_DIR,
    CACHE_TOKENS_DIR,
    CACHE_Z_DIR,
    layer_dir,
    shard_name,
)
from loralens.warehouse.parquet_files import write_parquet_file

# z is near-incompressible fp16 noise: a fast zstd level keeps the writer off the forward pass's cores.
Z_COMPRESSION_LEVEL = 1
META_COMPRESSION_LEVEL = 3


def binary_column(rows: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Return a `[n, ...]` numpy array as a fixed-size binary column, one row's bytes per value."""
    rows = np.ascontiguousarray(rows)
    width = rows.itemsize * int(np.prod(rows.shape[1:], dtype=np.int64))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows), [None, pa.py_buffer(rows)])


def binary_to_numpy(column: pa.ChunkedArray | pa.Array, dtype: np.dtype, width: int) -> np.ndarray:
    """Return a fixed-size binary column as a `[n, width]` numpy array of `dtype`."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        buf = chunk.buffers()[1]
        itemsize = np.dtype(dtype).itemsize
        start = chunk.offset * width * itemsize
        parts.append(np.frombuffer(buf, dtype=dtype, count=len(chunk) * width, offset=start).reshape(-1, width))
    if not parts:
        return np.empty((0, width), dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def tokens_table(shard: int, cols: dict[str, np.ndarray]) -> pa.Table:
    """Return the per-token metadata + target table of one shard."""
    n = len(cols["token_id"])
    target_top_k = {} if cols.get("topk_ids") is None or cols["topk_ids"].shape[1] == 0 else {
        "lse": pa.array(cols["lse"]),
        "topk_ids": _fixed_list(cols["topk_ids"]),
        "topk_logprobs": _fixed_list(cols["topk_logprobs"]),
    }  # stored only when a subset loss needs them
    return pa.table(
        {
            "shard": pa.array(np.full(n, shard, dtype=np.int32)),
            "row": pa.array(np.arange(n, dtype=np.int32)),
            "prompt_idx": pa.array(cols["prompt_idx"]),
            "position": pa.array(cols["position"]),
            "token_id": pa.array(cols["token_id"]),
            "next_token_id": pa.array(cols["next_token_id"]),
            "scale": pa.array(cols["scale"]),
            **target_top_k,
            "h_final": binary_column(cols["h_final"].astype(np.float32)),
        }
    )


def z_table(shard: int, z_bits: np.ndarray) -> pa.Table:
    """Return one layer's z table of one shard (z as raw 16-bit floats)."""
    n = len(z_bits)
    return pa.table(
        {
            "shard": pa.array(np.full(n, shard, dtype=np.int32)),
            "row": pa.array(np.arange(n, dtype=np.int32)),
            "z": binary_column(z_bits),
        }
    )


def prompts_table(prompts: Sequence[dict[str, Any]]) -> pa.Table:
    """Return the prompt metadata table of one shard."""
    schema = pa.schema(
        [
            ("prompt_idx", pa.int32()),
            ("prompt_id", pa.string()),
            ("source", pa.string()),
            ("text", pa.string()),
            ("toxicity", pa.float32()),
            ("n_tokens", pa.int32()),
            ("truncated", pa.bool_()),
        ]
    )
    return pa.Table.from_pylist(list(prompts), schema=schema)


def _write_parquet(adir: ArtifactDir, rel: str, table: pa.Table, level: int) -> ShardFile:
    return write_parquet_file(adir.path, rel, table, compression_level=level)


def shard_relpaths(index: int, layers: Iterable[int]) -> list[str]:
    """Return every file a cache shard consists of, relative to the artifact folder."""
    name = f"{shard_name(index)}.parquet"
    rels = [f"{CACHE_PROMPTS_DIR}/{name}", f"{CACHE_TOKENS_DIR}/{name}"]
    return rels + [f"{CACHE_Z_DIR}/{layer_dir(layer)}/{name}" for layer in layers]


def write_cache_shard(
    adir: ArtifactDir,
    index: int,
    cols: dict[str, np.ndarray],
    z: dict[int, np.ndarray],
    prompts: Sequence[dict[str, Any]],
) -> list[ShardFile]:
    """Write one shard's files (each atomically), then its record; return the files written."""
    name = f"{shard_name(index)}.parquet"
    files = [
        _write_parquet(adir, f"{CACHE_PROMPTS_DIR}/{name}", prompts_table(prompts), META_COMPRESSION_LEVEL),
        _write_parquet(adir, f"{CACHE_TOKENS_DIR}/{name}", tokens_table(index, cols), META_COMPRESSION_LEVEL),
    ]
    for layer, bits in z.items():
        files.append(
            _write_parquet(adir, f"{CACHE_Z_DIR}/{layer_dir(layer)}/{name}", z_table(index, bits), Z_COMPRESSION_LEVEL)
        )
    adir.record_shard(index, files)
    return files


# -- readers -------------------------------------------------------------------------------------
def _shard_paths(adir: ArtifactDir, sub: str, shards: Iterable[int] | None) -> list[Path]:
    folder = adir.path / sub
    if shards is None:
        return sorted(folder.glob("shard-*.parquet"))
    return [folder / f"{shard_name(i)}.parquet" for i in shards]


def read_tokens(adir: ArtifactDir, shards: Iterable[int] | None = None, columns: list[str] | None = None) -> pa.Table:
    """Return the token table of the given shards (all by default), in shard order."""
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in _shard_paths(adir, CACHE_TOKENS_DIR, shards)])


def read_prompts(adir: ArtifactDir) -> pa.Table:
    """Return the prompt metadata of every shard."""
    return pa.concat_tables([pq.read_table(p) for p in _shard_paths(adir, CACHE_PROMPTS_DIR, None)])


def read_layer_z(adir: ArtifactDir, layer: int, z_width: int, shards: Iterable[int] | None = None) -> np.ndarray:
    """Return one layer's z bits `[n, heads*d_head]` (uint16) for the given shards, in shard order."""
    parts = [
        binary_to_numpy(pq.read_table(p, columns=["z"]).column("z"), np.uint16, z_width)
        for p in _shard_paths(adir, f"{CACHE_Z_DIR}/{layer_dir(layer)}", shards)
    ]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def read_h_final(tokens: pa.Table, d_model: int) -> np.ndarray:
    """Return the cached lm_head inputs `[n, d_model]` float32 from a token table."""
    return binary_to_numpy(tokens.column("h_final"), np.float32, d_model)


def prompt_shards(adir: ArtifactDir) -> list[int]:
    """Return the done shards that hold prompts, in order: those before the manifest's `n_prompt_shards` (the rest
    hold lens-training text windows, with no prompt rows); every done shard before the manifest is written."""
    manifest = adir.manifest()
    done = sorted(adir.done_shards())
    n = None if manifest is None else manifest["summary"].get("n_prompt_shards")
    return done if n is None else [s for s in done if s < n]
