"""Heads the way a person types them: one parser for every API entry that takes heads, and range checks.

Accepted: "L21H3", "L21H3,L5H0", "21.3 5.0", ["L21H3", "L5H0"], [(21, 3)], (21, 3), and mixed lists such as
["L21H3", (5, 0)]. Anything else is a one-line ApiError naming the parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from numbers import Integral
from typing import Any, Union

import torch
from torch import nn

from loralens.api.errors import ApiError
from loralens.lens.heads.edits import Kind
from loralens.lens.heads.edits import ablate as _ablate
from loralens.lens.heads.head_sets import Head, parse_head_list
from loralens.lens.runtime.adapters import ArchAdapter, ModelDims, model_dims

HeadsLike = Union[str, Head, Iterable[Union[str, Head]]]  # noqa: UP007 - a runtime alias, py3.10 safe
FORMS = "'L<layer>H<head>' (e.g. 'L21H3'), 'LAYER.HEAD' (e.g. '21.3') or (layer, head) pairs"


def _is_index(x: Any) -> bool:
    """Return True for an integer that is not a bool (numpy integers too)."""
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_pair(x: Any) -> bool:
    """Return True for a `(layer, head)` pair of integers (tuple or list)."""
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(_is_index(v) for v in x)


def parse_heads(heads: HeadsLike, param: str = "heads") -> list[Head]:
    """Return `heads` as a list of `(layer, head)`, in order; ApiError naming `param` for a form not accepted."""
    if isinstance(heads, str):
        items: list[Any] = [heads]
    elif _is_pair(heads):
        items = [heads]
    else:
        try:
            items = list(heads)
        except TypeError:
            raise ApiError(f"{param}: expected {FORMS}, got {heads!r}") from None
    out: list[Head] = []
    for item in items:
        if isinstance(item, str):
            try:
                out += parse_head_list(item)
            except ValueError as err:
                raise ApiError(f"{param}{str(err).removeprefix('heads')}") from None
        elif _is_pair(item):
            out.append((int(item[0]), int(item[1])))
        else:
            raise ApiError(f"{param}: expected {FORMS}, got {item!r}")
    return out


def ranges(values: list[int]) -> str:
    """Return "0-29" for consecutive integers, else the comma-separated list."""
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))


def check_heads(heads: HeadsLike, layers: list[int], n_heads: int, param: str = "heads",
                what: str = "has no trained lens") -> list[Head]:
    """Return the parsed heads; ApiError naming `param` and the head when its layer is not in `layers` or its
    index not in `[0, n_heads)`."""
    out = parse_heads(heads, param)
    for layer, h in out:
        if layer not in layers:
            raise ApiError(f"{param}: L{layer}H{h}: layer {layer} {what} (layers: {ranges(layers)})")
        if not 0 <= h < n_heads:
            raise ApiError(f"{param}: L{layer}H{h}: head {h} is out of range: layers have {n_heads} heads "
                           f"(0-{n_heads - 1})")
    return out


@contextmanager
def ablate(model: nn.Module, heads: HeadsLike, kind: Kind = "zero", *, factor: float = 0.0,
           means: Mapping[Head, torch.Tensor] | None = None,
           direction: torch.Tensor | Mapping[Head, torch.Tensor] | None = None, adapter: ArchAdapter | None = None,
           dims: ModelDims | None = None) -> Iterator[None]:
    """Edit `heads` of a loaded HF causal LM inside the context (see `loralens.lens.heads.edits.ablate`).

    `kind`: "zero" removes the heads, "mean" sets their z to `means`, "scale" multiplies it by `factor`,
    "project" removes their write along `direction` `[d_model]`. No heads: the model is untouched. The family
    (`adapter`) and sizes (`dims`) are found from `model.config` unless given.
    """
    dims = dims or model_dims(model.config)
    wanted = check_heads(heads, list(range(dims.n_layers)), dims.n_heads, what="is not in the model")
    with _ablate(model, wanted, kind, factor=factor, means=means, direction=direction, adapter=adapter, dims=dims):
        yield
