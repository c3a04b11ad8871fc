"""The select stage's per-head steering directions, one safetensors file per version: for every direction source,
each cached layer's unit directions `d_hat/{source}/{layer}` `[H, d_head]` and their spreads `sigma/{source}/{layer}`
`[H]` (the standard deviation of z_h along d_hat_h over the scored positions). Written atomically; numpy only (the
warehouse never imports torch)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from loralens.warehouse.artifacts import atomic_write_with

# source -> layer -> array
ByLayer = dict[str, dict[int, np.ndarray]]


def write_directions(path: Path, d_hat: Mapping[str, Mapping[int, np.ndarray]],
                     sigma: Mapping[str, Mapping[int, np.ndarray]]) -> Path:
    """Write unit directions `{source: {layer: [H, dh]}}` and sigmas `{source: {layer: [H]}}` to `path`."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for source, by_layer in d_hat.items():
        for layer, d in by_layer.items():
            tensors[f"d_hat/{source}/{int(layer)}"] = np.ascontiguousarray(d, dtype=np.float32)
            tensors[f"sigma/{source}/{int(layer)}"] = np.ascontiguousarray(sigma[source][layer], dtype=np.float32)
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


def read_directions(path: Path) -> tuple[ByLayer, ByLayer]:
    """Return (d_hat, sigma) as written by `write_directions`, or raise naming the file."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no steering directions (select.steering.enabled was off)") from None
    out: dict[str, ByLayer] = {"d_hat": {}, "sigma": {}}
    for key, value in tensors.items():
        kind, source, layer = key.split("/")
        out[kind].setdefault(source, {})[int(layer)] = value
    return out["d_hat"], out["sigma"]


__all__ = ["ByLayer", "read_directions", "write_directions"]
