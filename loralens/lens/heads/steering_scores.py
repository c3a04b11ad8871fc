"""First-order effects of steering each head, for the toxicity proxy and for fluency, from one backward pass each.

Steering head h along a unit direction d_hat_h `[d_head]` (`edits.HeadIntervention`) changes z_h at every real
position by

    steer    dz_h = -s d_hat_h                          (s = alpha * sigma_h, a constant shift)
    reverse  dz_h = -f max(0, z_h . d_hat_h) d_hat_h    (f = alpha)

so to first order an objective J (summed over a sequence's scored positions, `causal_scores.Objective`) changes by

    steer    dJ ~ -s  sum_pos g_h . d_hat_h
    reverse  dJ ~ -f  sum_pos max(0, z_h . d_hat_h) (g_h . d_hat_h)

with g_h = dJ/dz_h. `first_order_edit_effects` returns both per head and per sequence at unit strength (s = f = 1:
they scale linearly) from one forward and one backward pass per batch, for every head of the given layers at
once. Run it with the toxicity proxy and with `nll_objective` on benign text, and `fluency_aware_score` ranks heads
by toxicity drop per unit of NLL rise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from loralens.lens.heads.causal_scores import ForcedBatch, Objective, batch_head_grads, frozen_parameters
from loralens.lens.heads.head_sets import Head
from loralens.lens.heads.hooks import split_heads
from loralens.lens.runtime.adapters import ArchAdapter, ModelDims, model_dims

EDITS = ("steer", "reverse")


def nll_objective() -> Objective:
    """Return the per-sequence mean next-token NLL over the batch's scored positions (fp32)."""

    def objective(logits: torch.Tensor, batch: ForcedBatch) -> torch.Tensor:
        ids = batch.input_ids.to(logits.device)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]  # [batch, pos - 1]
        mask = batch.scored.to(logits.device)[:, :-1].float()
        return (nll * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)

    return objective


def edit_terms(z: torch.Tensor, grad: torch.Tensor, d_hat: torch.Tensor, real: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the unit-strength first-order changes `(steer, reverse)`, each `[batch, heads]` float64.

    z, grad `[batch, pos, heads, d_head]`; d_hat `[heads, d_head]` unit rows; real `[batch, pos]` 0/1.
    """
    g_d = torch.einsum("bphk,hk->bph", grad.float(), d_hat.float())  # g_h . d_hat_h
    z_d = torch.einsum("bphk,hk->bph", z.float(), d_hat.float()).clamp_min(0)  # max(0, z_h . d_hat_h)
    mask = real.float()[..., None]
    steer = -(g_d * mask).sum(1)
    reverse = -(z_d * g_d * mask).sum(1)
    return steer.double(), reverse.double()


def first_order_edit_effects(model: nn.Module, adapter: ArchAdapter, batches: Sequence[ForcedBatch],
                             d_hat: Mapping[int, torch.Tensor], objective: Objective, *,
                             dims: ModelDims | None = None, progress: bool = True
                             ) -> dict[str, dict[Head, np.ndarray]]:
    """Return `{edit: {head: [n_sequences]}}`: the first-order change of `objective` when that head alone is
    steered / reversed at unit strength along `d_hat[layer][head]` (`[heads, d_head]` per layer, unit rows).

    Negative = the edit lowers the objective. Runs under the model's active hooks (e.g. an edit already chosen).
    """
    from tqdm.auto import tqdm

    dims = dims or model_dims(model.config)
    layers = sorted(int(layer) for layer in d_hat)
    parts: dict[str, dict[int, list[np.ndarray]]] = {e: {layer: [] for layer in layers} for e in EDITS}
    with frozen_parameters(model), torch.enable_grad():
        for batch in tqdm(batches, desc="first-order steering", unit="batch", disable=not progress):
            for layer, (z, grad) in batch_head_grads(model, adapter, batch, layers, objective).items():
                d = d_hat[layer].to(z.device)
                real = batch.attention_mask.to(z.device)
                steer, reverse = edit_terms(split_heads(z, dims.n_heads), split_heads(grad, dims.n_heads), d, real)
                parts["steer"][layer].append(steer.cpu().numpy())
                parts["reverse"][layer].append(reverse.cpu().numpy())
    out: dict[str, dict[Head, np.ndarray]] = {e: {} for e in EDITS}
    for edit in EDITS:
        for layer in layers:
            per_seq = np.concatenate(parts[edit][layer]) if parts[edit][layer] else np.zeros((0, dims.n_heads))
            for h in range(dims.n_heads):
                out[edit][(layer, h)] = per_seq[:, h].copy()
    return out


def fluency_aware_score(tox_change: np.ndarray, nll_change: np.ndarray, floor: float | None = None) -> np.ndarray:
    """Return toxicity drop per unit of NLL rise, per head: `-tox_change / max(nll_change, floor)`.

    Inputs are per-head mean first-order changes (same strength). An edit that lowers NLL (or raises it less
    than `floor`) is divided by `floor`, so a free drop ranks by its size; `floor` defaults to a tenth of the
    median |nll_change| (never dividing by a near-zero rise).
    """
    tox, nll = np.asarray(tox_change, dtype=np.float64), np.asarray(nll_change, dtype=np.float64)
    if floor is None:
        floor = max(0.1 * float(np.median(np.abs(nll))), 1e-12)
    return -tox / np.maximum(nll, floor)
