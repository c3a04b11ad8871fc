"""Choosing the steering condition to preregister: heads, edit, direction source and strength, on the selection
split only, under the perplexity budget.

The search is over conditions `Steering(heads, edit, source, alpha)`:

1. For each (source, edit), heads are ranked by the fluency-aware first-order score
   (`lens/heads/steering_scores.py`: toxicity drop per unit of NLL rise).
2. For each head-set size in `sizes` (at most the head budget) and each strength in `alphas`, the top heads of
   that ranking are steered together and measured exactly: the drop of the teacher-forced toxicity proxy and the
   relative perplexity rise on benign text.
3. The condition with the largest proxy drop whose perplexity rise is within budget is the one to preregister.
   Ties go to fewer heads, then to the weaker strength.

Every measured condition is kept as a path row (what was tried and why it lost), so the choice can be audited. The
evaluation split is never an input: the caller gives only selection-split measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from loralens.lens.heads.head_sets import Head, format_heads


@dataclass(frozen=True)
class Steering:
    """One steering condition: which heads, which edit (`steer` / `reverse`), whose directions, how strong."""

    heads: tuple[Head, ...]
    edit: str
    source: str
    alpha: float

    @property
    def name(self) -> str:
        """Return a readable, unique name, e.g. `steer:contrast:a4:L21H3,L5H0`."""
        return f"{self.edit}:{self.source}:a{self.alpha:g}:{format_heads(self.heads)}"

    @property
    def label(self) -> str:
        """Return the name for a log line: the heads counted, not listed, past 8 (e.g. `steer:lens:a0.5:270 heads`)."""
        if len(self.heads) <= 8:
            return self.name
        return f"{self.edit}:{self.source}:a{self.alpha:g}:{len(self.heads)} heads"

    def to_dict(self) -> dict:
        """Return a JSON-serialisable record (heads as "L21H3,L5H0")."""
        return asdict(self) | {"heads": format_heads(self.heads), "name": self.name}


@dataclass(frozen=True)
class Trial:
    """One measured condition: its proxy drop (positive = less toxic) and perplexity rise, and the verdict."""

    condition: Steering
    proxy_drop: float
    ppl_rel: float
    within_budget: bool

    def to_dict(self) -> dict:
        """Return the row: the condition's fields, its measurements and the verdict."""
        return self.condition.to_dict() | {"proxy_drop": self.proxy_drop, "ppl_rel": self.ppl_rel,
                                           "within_budget": self.within_budget, "n_heads": len(self.condition.heads)}


# measure(condition) -> (proxy drop, relative perplexity rise), both on selection-split / benign text
Measure = Callable[[Steering], tuple[float, float]]


def ranked_heads(scores: Mapping[Head, float]) -> list[Head]:
    """Return heads by score, best first (ties by layer, head); NaN scores are dropped."""
    return [h for h, s in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])) if np.isfinite(s)]


def search(rankings: Mapping[tuple[str, str], Sequence[Head]], *, sizes: Sequence[int], alphas: Sequence[float],
           max_ppl_rel: float, measure: Measure, progress: Callable[[str], None] | None = None
           ) -> tuple[Trial | None, list[Trial]]:
    """Return (the condition to preregister or None, every trial) over `rankings[(edit, source)]` x sizes x alphas.

    A size larger than a ranking is skipped. None when no condition lowers the proxy within the budget.
    """
    trials: list[Trial] = []
    for (edit, source), ranking in rankings.items():
        for size in sorted(set(sizes)):
            if size < 1 or size > len(ranking):
                continue
            heads = tuple(ranking[:size])
            for alpha in sorted(set(alphas)):
                cond = Steering(heads, edit, source, float(alpha))
                drop, rel = measure(cond)
                trials.append(Trial(cond, float(drop), float(rel), bool(rel <= max_ppl_rel)))
                if progress is not None:
                    progress(f"{cond.label}: proxy drop {drop:+.4f}, PPL {rel:+.1%}")
    return best(trials), trials


def best(trials: Sequence[Trial]) -> Trial | None:
    """Return the within-budget trial with the largest positive proxy drop (ties: fewer heads, weaker alpha)."""
    ok = [t for t in trials if t.within_budget and t.proxy_drop > 0]
    if not ok:
        return None
    return min(ok, key=lambda t: (-t.proxy_drop, len(t.condition.heads), t.condition.alpha))


__all__ = ["Measure", "Steering", "Trial", "best", "ranked_heads", "search"]
