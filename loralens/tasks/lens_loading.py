"""Loading trained lenses and walking the cache: what decode (and `loralens.api`) read heads with.

`load_reader` loads the model's frozen lens weights with a train version's lens banks; `cached_layers` names the
layers a cache version holds (every later stage asks).

One pass = for each cache shard, for each trained layer, the per-head lens inputs `[n, H, d]` at the selected
positions (the last prompt token by default), in chunks of `chunk` positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loralens.config import PipelineConfig
from loralens.lens.heads.capture import from_storage
from loralens.lens.lenses.lens_set import lens_inputs
from loralens.lens.lenses.readout import HeadReader, load_head_reader, row_chunks
from loralens.lens.runtime.lean import LeanModel, load_lean
from loralens.tasks.stage_versions import StageVersion
from loralens.warehouse.activation_cache import read_layer_z, read_tokens
from loralens.warehouse.artifacts import ArtifactDir
from loralens.warehouse.constants import LENSES_DIR, layer_dir


@dataclass
class Positions:
    """The selected positions of one cache shard."""

    shard: int
    rows: np.ndarray  # row indices into the shard's tokens table
    prompt_idx: np.ndarray
    position: np.ndarray
    scale: torch.Tensor  # [n] final-norm divisor


def select_positions(cache: ArtifactDir, shard: int, which: str) -> Positions:
    """Return the shard's positions to read: each prompt's last token ("last") or every token ("all")."""
    t = read_tokens(cache, [shard], columns=["prompt_idx", "position", "scale"])
    prompt_idx = t.column("prompt_idx").to_numpy()
    position = t.column("position").to_numpy()
    if which == "all":
        rows = np.arange(len(prompt_idx))
    else:
        last = {}
        for i, (p, pos) in enumerate(zip(prompt_idx.tolist(), position.tolist(), strict=True)):
            if pos >= last.get(p, (-1, -1))[0]:
                last[p] = (pos, i)
        rows = np.array(sorted(i for _, i in last.values()), dtype=np.int64)
    scale = torch.from_numpy(t.column("scale").to_numpy()[rows].astype(np.float32))
    return Positions(shard, rows, prompt_idx[rows], position[rows], scale)


def load_reader(cfg: PipelineConfig, train_ver: StageVersion, layers: list[int]) -> tuple[LeanModel, HeadReader]:
    """Return the model's frozen lens weights (read lean, no model built) and a HeadReader with the lens banks,
    on `model.device`."""
    loaded = load_lean(cfg.model.name, cfg.home, layers, revision=cfg.model.revision,
                       trust_remote_code=cfg.model.trust_remote_code)
    lenses = train_ver.artifact.path / LENSES_DIR
    reader = load_head_reader(loaded, {layer: lenses / layer_dir(layer) for layer in layers})
    return loaded, reader.to(cfg.model.torch_device())


def cached_layers(cache_manifest: dict[str, Any]) -> list[int]:
    """Return the layers a cache version holds."""
    return list(cache_manifest["config"]["cache"]["layers"] or range(cache_manifest["summary"]["n_layers"]))


def layer_input_chunks(cache: ArtifactDir, pos: Positions, layer: int, reader: HeadReader,
                       cache_summary: dict[str, Any], chunk: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (rows of `pos`, lens inputs `[n, H, d]`) of one layer at the selected positions."""
    width = cache_summary["n_heads"] * cache_summary["d_head"]
    z_bits = read_layer_z(cache, layer, width, [pos.shard])[pos.rows]
    for rows in row_chunks(len(pos.rows), chunk):
        z = from_storage(z_bits[rows], cache_summary["store_dtype"]).to(reader.device)
        yield rows, lens_inputs(z, pos.scale[rows].to(reader.device), reader.w_o[layer])
