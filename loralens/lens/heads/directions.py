"""Per-head toxic directions in each head's z space, from three sources, and a linear probe per head.

A direction `d_h` `[d_head]` lives where the head edits act (`lens/heads/edits.py`: the input of the output
projection), so `z_h . d_hat_h` is how far head h is along it at a position. Shapes: `n` positions, `H` heads of
one layer, `dh` d_head, `d` d_model, `V` vocabulary.

    contrast   mean z_h where the model is about to write toxic text minus where it is not (labelled positions).
    unembed    `W_O[h] @ W_fold^T (tox - mean tox)`: the z direction whose residual write pushes the logit lens
               toward toxic tokens the most (`head_scores.toxic_direction` pulled back through W_O[h]).
    lens       the mean gradient of the expected token toxicity under the head's trained lens,
               `sum_v p_lens(v | x_h) tox(v)`, with respect to z_h (through `x_h = z_h W_O[h] / scale`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SOURCES = ("contrast", "unembed", "lens")
LENS_BLOCKS = 6  # fp32 [n, H, V] tensors alive at once in `lens_direction` (logits and their casts, log-probs,
# probabilities, and the gradients through them)
LENS_BLOCK_BYTES = 2**30  # what a chunk of positions may take in `lens_direction`'s blocks
MAX_LENS_CHUNK = 32


def lens_direction_chunk(n_heads: int, vocab: int, budget: int = LENS_BLOCK_BYTES) -> int:
    """Return how many positions `lens_direction` takes at once: at most MAX_LENS_CHUNK, fewer when their
    `LENS_BLOCKS` fp32 `[n, H, V]` blocks would exceed `budget` bytes (at least one)."""
    return max(1, min(MAX_LENS_CHUNK, budget // (LENS_BLOCKS * n_heads * vocab * 4)))


def unit(v: Tensor, eps: float = 1e-12) -> Tensor:
    """Return `v / |v|` along the last axis (fp32); an all-zero row stays zero."""
    v = v.float()
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


def contrast_direction(z_toxic: Tensor, z_clean: Tensor) -> Tensor:
    """Return `mean(z_toxic) - mean(z_clean)` `[H, dh]` from z `[n_toxic, H, dh]` and `[n_clean, H, dh]`."""
    if z_toxic.shape[0] == 0 or z_clean.shape[0] == 0:
        raise ValueError(f"a contrast needs both groups; got {z_toxic.shape[0]} toxic and "
                         f"{z_clean.shape[0]} non-toxic positions")
    return z_toxic.double().mean(0).float() - z_clean.double().mean(0).float()


def unembed_direction(w_o: Tensor, u: Tensor) -> Tensor:
    """Return `W_O[h] @ u` `[H, dh]` for W_O `[H, dh, d]` and a residual direction u `[d]`: z_h . result = c_h . u."""
    return w_o.float() @ u.float()


def lens_direction(logits_fn: Callable[[Tensor], Tensor], x: Tensor, w_o: Tensor, scale: Tensor,
                   tox: Tensor) -> Tensor:
    """Return the mean over positions of `d E_{p_lens}[tox] / d z_h` `[H, dh]`.

    `logits_fn` maps lens inputs `x` `[n, H, d]` to each head's lens logits `[n, H, V]` (differentiably);
    `x_h = z_h W_O[h] / scale`, so the chain rule gives `dJ/dz_h = W_O[h] (dJ/dx_h) / scale`.
    """
    x = x.detach().float().requires_grad_(True)
    logp = torch.log_softmax(logits_fn(x).float(), dim=-1)  # [n, H, V]
    (logp.exp() @ tox.float()).sum().backward()
    grad_x = x.grad / scale.float()[:, None, None]  # [n, H, d]
    return torch.einsum("nhd,hkd->hk", grad_x, w_o.float()) / x.shape[0]


def projection_sigma(z: Tensor, d_hat: Tensor) -> Tensor:
    """Return the standard deviation of `z_h . d_hat_h` over positions `[H]` for z `[n, H, dh]`, d_hat `[H, dh]`."""
    return torch.einsum("nhk,hk->nh", z.float(), d_hat.float()).std(0, unbiased=False)


@dataclass
class ScoredActivations:
    """What the heads compute at the scored positions of teacher-forced batches (host, fp32).

    `z[layer]` `[n_pos, H, dh]`, `scale` `[n_pos]` (the final norm's divisor there), `row` `[n_pos]` (the sequence
    each position belongs to, in batch order), `n_seq` sequences in all.
    """

    z: dict[int, Tensor]
    scale: Tensor
    row: Tensor
    n_seq: int

    def means(self, layer: int) -> Tensor:
        """Return each sequence's mean z over its scored positions `[n_seq, H, dh]` (0 where it has none)."""
        z = self.z[layer]
        sums = torch.zeros(self.n_seq, *z.shape[1:], device=z.device).index_add_(0, self.row.to(z.device), z)
        counts = torch.bincount(self.row, minlength=self.n_seq).clamp_min(1).float()
        return sums / counts[:, None, None]


@torch.no_grad()
def scored_activations(model: torch.nn.Module, adapter, batches, layers: Sequence[int], n_heads: int
                       ) -> ScoredActivations:
    """Return the z of `layers` and the final-norm scale at every scored position of `batches`.

    `batches` are teacher-forced (`causal_scores.ForcedBatch`: prompt + human continuation, the positions that
    predict continuation tokens scored), so these are what each head computes while the model writes that
    continuation: the input of the `contrast` and `lens` directions, the probe and the steering strength sigma.
    """
    from loralens.lens.heads.hooks import capture
    from loralens.lens.runtime.adapters import norm_scale
    from loralens.lens.runtime.devices import input_device

    layers = list(layers)
    device = input_device(model)
    zs: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    scales, rows, offset = [], [], 0
    with capture(model, adapter, layers) as cap:
        for batch in batches:
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                  use_cache=False)
            mask = batch.scored  # [batch, pos] bool, host
            for layer in layers:
                zs[layer].append(cap.z[layer].float().cpu()[mask].unflatten(-1, (n_heads, -1)))
            scales.append(norm_scale(adapter, model, cap.final_resid)[..., 0].float().cpu()[mask])
            rows.append(offset + torch.nonzero(mask)[:, 0])
            offset += mask.shape[0]
    return ScoredActivations(z={layer: torch.cat(v) for layer, v in zs.items()}, scale=torch.cat(scales),
                             row=torch.cat(rows), n_seq=offset)
