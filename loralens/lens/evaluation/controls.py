"""A condition against its random-head controls: paired, per prompt, with a bootstrap interval.

Scores are `[prompts, k]` toxicities sampled with the SAME prompts and seeds in every condition (the intervene
stage's paired design), so the natural unit is the prompt's drop of its max toxicity against the baseline:

    drop[i]        = max_j base[i, j] - max_j cond[i, j]              (the mean over i is the EMT drop)
    random_drop[i] = mean over random sets s of (max_j base[i, j] - max_j rand_s[i, j])
    excess[i]      = drop[i] - random_drop[i]

"Versus random" is the mean of `excess` with a percentile bootstrap interval over prompts (all three arrays are
resampled together, so the interval keeps the pairing), and the ratio drop / random_drop only where the random
sets lowered toxicity on average. Where they raised it ("random rose"), a ratio would be negative or infinite and
any drop would look infinitely better: it is reported as such and never counts as beating the controls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from loralens.lens.evaluation.toxicity_metrics import bootstrap_ci


def prompt_max(scores: np.ndarray) -> np.ndarray:
    """Return each prompt's max toxicity `[prompts]` of scores `[prompts, k]`."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores must be a non-empty [prompts, k] array, got shape {s.shape}")
    return s.max(axis=1)


def paired_drops(condition: np.ndarray, baseline: np.ndarray, randoms: Sequence[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Return (drop `[prompts]`, mean random drop `[prompts]`) of per-prompt max toxicity against the baseline.

    Every array is `[prompts, k]` over the same prompts; with no random set the random drop is all nan.
    """
    base = prompt_max(baseline)
    drop = base - prompt_max(condition)
    if not randoms:
        return drop, np.full_like(drop, np.nan)
    rand = np.mean([base - prompt_max(r) for r in randoms], axis=0)
    if rand.shape != drop.shape:
        raise ValueError(f"random sets must score the condition's {drop.shape[0]} prompts, got {rand.shape[0]}")
    return drop, rand


@dataclass(frozen=True)
class VersusRandom:
    """One condition against the random sets of its size (every figure is an EMT difference, higher = better)."""

    drop: float  # the condition's EMT drop vs the baseline
    random_drop: float  # the mean EMT drop of the random sets (nan: no random set)
    excess: float  # drop - random_drop
    excess_low: float  # paired bootstrap interval of excess over prompts
    excess_high: float
    ratio: float | None  # drop / random_drop, only where random_drop > 0
    random_rose: bool  # the random sets raised toxicity on average (random_drop <= 0)
    n_random: int

    def beats(self, times: float) -> bool:
        """Return whether the condition beats its controls `times` over: the random sets lowered toxicity, the
        ratio is >= `times`, and the excess drop's interval lies above zero. "Random rose" never passes."""
        return (self.n_random > 0 and not self.random_rose and self.ratio is not None and self.ratio >= times
                and self.excess_low > 0)

    def to_dict(self) -> dict:
        """Return the fields as a JSON-friendly dict."""
        return asdict(self)


def versus_random(condition: np.ndarray, baseline: np.ndarray, randoms: Sequence[np.ndarray], *,
                  n_boot: int = 1000, seed: int = 0) -> VersusRandom:
    """Return the condition's paired comparison with its random controls (scores `[prompts, k]` each)."""
    drop, rand = paired_drops(condition, baseline, randoms)
    d, r = float(drop.mean()), float(rand.mean())
    if not randoms:
        return VersusRandom(d, float("nan"), float("nan"), float("nan"), float("nan"), None, False, 0)
    excess = (drop - rand)[:, None]  # [prompts, 1]: resampling rows resamples prompts, pairing kept
    low, high = bootstrap_ci(excess, lambda x: x.mean(axis=(-2, -1)), n_boot=n_boot, seed=seed, batched=True)
    rose = r <= 0
    return VersusRandom(d, r, d - r, low, high, None if rose else d / r, rose, len(randoms))


__all__ = ["VersusRandom", "paired_drops", "prompt_max", "versus_random"]
