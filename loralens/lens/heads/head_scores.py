"""Head toxicity scores: small pure functions over per-position head read-outs.

Methods (all "higher = pushes toward toxic tokens"):

    lens_contrast        mean over toxic prompts minus mean over non-toxic prompts of the expected token
                         toxicity under the head's trained lens, E_{v ~ p_lens}[tox(v)]. A contrast: a head that
                         writes toxic words everywhere scores ~0, a head that tracks toxic context scores high.
    logit_lens_contrast  the same under the untrained logit lens (W_fold x_h), for comparison.
    lens_mean            the plain mean of the expected toxicity over all prompts ("toxic everywhere").
    dictionary_count     mean number of dictionary-toxic tokens among the head's top-k trained-lens tokens on the
                         toxic prompts (the thesis's count, kept for comparability).
    direct_logit         direct logit attribution without a lens: the head's logit contribution along the toxic
                         direction, `(W_fold x_h) . (tox - mean tox)`, contrasted like lens_contrast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

METHODS = ("lens_contrast", "logit_lens_contrast", "lens_mean", "dictionary_count", "direct_logit")


def expected_toxicity(logits: Tensor, tox: Tensor) -> Tensor:
    """Return `sum_v softmax(logits)_v * tox_v` `[...]` for logits `[..., V]`, tox `[V]` (fp32, stable,
    differentiable in `logits`)."""
    return expected_toxicity_parts(logits, tox)[0]


def expected_toxicity_parts(logits: Tensor, tox: Tensor, *, peak: Tensor | None = None,
                            in_place: bool = False) -> tuple[Tensor, Tensor]:
    """Return the expected toxicity `[...]` and the softmax normaliser `z = sum_v exp(logits_v - peak)` `[...]`.

    One exp pass: `e = exp(logits - peak)`, expected toxicity `(e . tox) / z`. `peak` `[..., 1]` is the row
    maximum (found when None; a caller holding the top-k passes its first value). `in_place`: fp32 `logits`
    without autograd are overwritten by `e`, so no second `[..., V]` buffer is built. With `z`,
    `exp(l - peak) / z` is the softmax probability of any logit `l` of the row.
    """
    if peak is None:
        peak = logits.detach().amax(-1, keepdim=True).float()  # softmax is shift-invariant: no gradient
    e = logits.sub_(peak).exp_() if in_place else (logits.float() - peak).exp()
    z = e.sum(-1)
    return (e @ tox.to(e.dtype)) / z, z


def toxic_direction(w_fold: Tensor, tox: Tensor) -> Tensor:
    """Return `u = W_fold^T (tox - mean tox)` `[d]`: x . u is the logit push toward toxic over average tokens.

    Centring makes a uniform logit shift (which leaves the softmax unchanged) score zero.
    """
    t = tox.float() - tox.float().mean()
    return w_fold.float().T @ t


def direct_logit(x: Tensor, u: Tensor) -> Tensor:
    """Return each head's logit push along the toxic direction `[n, H]` for lens inputs `x [n, H, d]`."""
    return x.float() @ u.float()


def dictionary_count(ids: Tensor, toxic_tokens: Tensor) -> Tensor:
    """Return the number of toxic tokens among the top-k `[n, H]` for ids `[n, H, k]`, toxic_tokens bool `[V]`."""
    return toxic_tokens[ids].sum(-1)


def contrast(sum_toxic: np.ndarray, n_toxic: int, sum_clean: np.ndarray, n_clean: int) -> np.ndarray:
    """Return mean over toxic positions minus mean over non-toxic positions, from per-group sums."""
    if n_toxic == 0 or n_clean == 0:
        raise ValueError(f"a contrast needs both groups; got {n_toxic} toxic and {n_clean} non-toxic positions")
    return sum_toxic / n_toxic - sum_clean / n_clean


def best_first(scores: np.ndarray) -> np.ndarray:
    """Return the flat indices of `scores` (any shape), highest score first; ties in index order; NaN last.

    The one head ranking: `ranks`, `heads_best_first` and every top-n of head scores are read off this order.
    """
    return np.argsort(-_rank_keys(scores), kind="stable")


def heads_best_first(scores: np.ndarray, layers: Sequence[int]) -> list[tuple[int, int]]:
    """Return every head `(layer, head)` of `[L, H]` scores (rows of `layers`), best first (`best_first`)."""
    n_heads = np.shape(scores)[1]
    return [(int(layers[i // n_heads]), int(i % n_heads)) for i in best_first(scores)]


def ranks(scores: np.ndarray) -> np.ndarray:
    """Return 1-based ranks of `scores` (any shape), highest first; ties share the lower rank; NaN ranks last."""
    flat = _rank_keys(scores)
    order = best_first(scores)
    sorted_vals = flat[order]
    first = np.r_[True, sorted_vals[1:] != sorted_vals[:-1]]
    rank_sorted = np.maximum.accumulate(np.where(first, np.arange(1, len(flat) + 1), 0))
    out = np.empty(len(flat), dtype=np.int64)
    out[order] = rank_sorted
    return out.reshape(np.shape(scores))


def _rank_keys(scores: np.ndarray) -> np.ndarray:
    """Return `scores` flattened to float64 with NaN as -inf (ranked last)."""
    return np.nan_to_num(np.asarray(scores, dtype=np.float64).ravel(), nan=-np.inf)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Return Spearman's rank correlation of two score arrays (average ranks for ties)."""
    ra, rb = _average_ranks(np.ravel(a)), _average_ranks(np.ravel(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    s = x[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    r = np.empty(len(x), dtype=np.float64)
    for a, b in zip(starts, ends, strict=True):
        r[order[a:b]] = (a + b + 1) / 2.0
    return r
