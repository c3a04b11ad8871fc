"""What a head adds to the model's own output: the model's next-token log-probs with the head, and with the head
mean-ablated (its z set to its mean over reference text), every path from the head to the output included (later
heads and MLPs), where a lens reads only the head's direct write `W_fold x_h`.

Two readings of the difference, both per token `v` at each position:
    log-prob lift        log p(v) - log p_ablated(v): specific (a head that only sharpens the model's own guess
                         lifts nothing), but its top is often a rare token with a tiny probability either way
    probability added    p(v) - p_ablated(v): the mass the head moves, readable, but it favours the model's likely
                         tokens (any head that makes the model surer of its guess adds most to that guess)

Shapes: `B` sequences, `T` positions, `n` = B * len(rows) read positions, `V` vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from loralens.lens.heads.edits import HeadIntervention, intervene
from loralens.lens.heads.head_sets import Head
from loralens.lens.runtime.adapters import ArchAdapter, ModelDims
from loralens.lens.runtime.devices import input_device


@torch.no_grad()
def output_log_probs(model: nn.Module, tokens: Tensor, rows: slice | Tensor) -> Tensor:
    """Return the model's next-token log-probs `[n, V]` fp32 at positions `rows` of `tokens` `[B, T]`."""
    logits = model(input_ids=tokens.to(input_device(model)), use_cache=False).logits[:, rows]
    return logits.float().log_softmax(-1).reshape(-1, logits.shape[-1])


@torch.no_grad()
def head_effects(model: nn.Module, adapter: ArchAdapter, dims: ModelDims, tokens: Tensor, rows: slice | Tensor,
                 heads: Sequence[Head], means: Mapping[Head, Tensor]) -> Iterator[tuple[Head, Tensor, Tensor]]:
    """Yield `(head, base, ablated)` for each of `heads`: the model's log-probs `[n, V]` at positions `rows` of
    `tokens` `[B, T]` as it is (computed once) and with that head alone mean-ablated (`means`: head -> `[d_head]`).

    One forward pass per head with the model's own attention implementation (so an inert head's difference is
    exactly zero); the ablation's hooks are off again before each yield.
    """
    from tqdm.auto import tqdm

    base = output_log_probs(model, tokens, rows)
    for head in tqdm(heads, desc="head effects", unit="head", disable=len(heads) < 8):
        with intervene(model, adapter, HeadIntervention(kind="mean", heads=(head,), means=means), dims):
            ablated = output_log_probs(model, tokens, rows).to(base.device)
        yield head, base, ablated
