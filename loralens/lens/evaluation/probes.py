"""A linear probe per head: how well each head's z separates toxic from non-toxic contexts (held-out AUROC)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from loralens.lens.evaluation.scorers import roc_auc


def fit_probe(z: Tensor, labels: Tensor, *, steps: int = 200, l2: float = 1e-3, lr: float = 0.05) -> Tensor:
    """Return per-head logistic-regression weights `[H, dh + 1]` (last: bias) for z `[n, H, dh]`, labels `[n]`.

    All heads at once (full-batch Adam on standardized z, L2 penalty `l2`); fp32, deterministic.
    """
    y = labels.float()[:, None]  # [n, 1]
    mu, sd = z.float().mean(0), z.float().std(0).clamp_min(1e-6)  # [H, dh]
    zs = (z.float() - mu) / sd
    w = torch.zeros(z.shape[1], z.shape[2] + 1, device=z.device)
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        logits = torch.einsum("nhk,hk->nh", zs, w[:, :-1]) + w[:, -1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.expand_as(logits))
        (loss + l2 * w[:, :-1].pow(2).sum(-1).mean()).backward()
        opt.step()
    w = w.detach()
    # fold the standardization back in: w . (z - mu) / sd + b
    w_raw = w[:, :-1] / sd
    b_raw = w[:, -1] - (w_raw * mu).sum(-1)
    return torch.cat([w_raw, b_raw[:, None]], dim=-1)


def probe_scores(w: Tensor, z: Tensor) -> Tensor:
    """Return the probe logits `[n, H]` of weights `[H, dh + 1]` on z `[n, H, dh]`."""
    return torch.einsum("nhk,hk->nh", z.float(), w[:, :-1]) + w[:, -1]


def probe_auroc(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor) -> np.ndarray:
    """Return each head's held-out AUROC `[H]` of a probe fit on the training positions."""
    scores = probe_scores(fit_probe(z_train, y_train), z_test).cpu().numpy()
    labels = y_test.cpu().numpy().astype(bool)
    return np.array([roc_auc(labels, scores[:, h]) for h in range(scores.shape[1])])
