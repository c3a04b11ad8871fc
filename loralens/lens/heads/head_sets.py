"""Head sets as a person writes them and as controls draw them: parse "L3H1,L5H0", format, random sets."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

Head = tuple[int, int]  # (layer, head)

_DOTTED = re.compile(r"(\d+)\.(\d+)")
_LH = re.compile(r"[Ll](\d+)[Hh](\d+)")


def parse_head_list(text: str) -> tuple[Head, ...]:
    """Parse "3.1, 5.0" or "L3H1 L5H0" (comma and/or space separated) into ((3, 1), (5, 0)), in order."""
    heads = []
    for token in re.split(r"[,\s]+", text.strip()):
        if not token:
            continue
        match = _DOTTED.fullmatch(token) or _LH.fullmatch(token)
        if match is None:
            raise ValueError(f"heads: bad head '{token}'; expected LAYER.HEAD (e.g. 3.1) or LxHy (e.g. L3H1)")
        heads.append((int(match[1]), int(match[2])))
    return tuple(heads)


def format_heads(heads: Iterable[Head]) -> str:
    """Format heads as "L3H1,L5H0" (parse_head_list reads it back)."""
    return ",".join(f"L{layer}H{head}" for layer, head in heads)


def random_head_sets(
    n_layers: int,
    n_heads: int,
    size: int,
    seeds: Sequence[int],
    exclude: Iterable[Head] = (),
) -> list[tuple[Head, ...]]:
    """Return one sorted random set of `size` heads per seed, drawn without replacement outside `exclude`.

    Each set depends only on its own seed (numpy Generator), so control sets are reproducible.
    """
    excluded = {(int(layer), int(head)) for layer, head in exclude}
    pool = [(layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in excluded]
    if not 0 <= size <= len(pool):
        raise ValueError(f"size: {size} heads requested but only {len(pool)} are available outside exclude")
    sets = []
    for seed in seeds:
        picks = np.random.default_rng(seed).choice(len(pool), size=size, replace=False)
        sets.append(tuple(sorted(pool[i] for i in picks)))
    return sets
