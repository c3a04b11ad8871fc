"""Greedy forward selection of a head set: the cheap proxy proposes, perplexity and sampling decide.

At each step every remaining candidate is scored by the drop of a teacher-forced toxicity proxy when it joins the
current set (exact: the set is ablated together, so interactions count). The best few (`tries`), in proxy order,
are checked: a head whose set would raise perplexity over budget is rejected; otherwise the set is sampled and the
head is accepted if the paired expected max toxicity (same prompts, same seeds) falls against the current set.
A rejected head is not tried again. The selection stops at the head budget, or when no tried head is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from loralens.lens.evaluation.statistics import expected_max_toxicity
from loralens.lens.heads.head_sets import Head

# proxy_drops(current set, candidates) -> {head: proxy drop when it joins the set}
ProxyDrops = Callable[[tuple[Head, ...], Sequence[Head]], dict[Head, float]]
# ppl_rel(head set) -> relative perplexity change against the unablated model
PplRel = Callable[[tuple[Head, ...]], float]
# sample(head set) -> toxicity [prompts, k] with that set ablated (the same prompts and seeds for every set)
Sample = Callable[[tuple[Head, ...]], np.ndarray]


@dataclass(frozen=True)
class PathStep:
    """One candidate tried: its step, order within the step, proxy drop, and what sampling and perplexity said."""

    step: int
    try_: int
    head: Head
    proxy_drop: float
    emt: float | None
    emt_drop: float | None
    ppl_rel: float | None
    accepted: bool
    reason: str  # accepted | ppl over budget | no sampled drop | no proxy drop

    def to_dict(self) -> dict:
        """Return the row as a dict (head as layer, head)."""
        d = asdict(self)
        layer, head = d.pop("head")
        return {"step": d.pop("step"), "try": d.pop("try_"), "layer": layer, "head": head, **d}


def greedy_select(candidates: Sequence[Head], *, budget: int, max_ppl_rel: float, tries: int,
                  proxy_drops: ProxyDrops, ppl_rel: PplRel, sample: Sample,
                  progress: Callable[[str], None] | None = None) -> tuple[tuple[Head, ...], list[PathStep]]:
    """Return (the chosen heads in the order added, every candidate tried) of the greedy selection."""
    chosen: list[Head] = []
    remaining = list(dict.fromkeys(candidates))
    current = sample(())
    path: list[PathStep] = []
    step = 0
    while len(chosen) < budget and remaining:
        step += 1
        drops = proxy_drops(tuple(chosen), remaining)
        order = sorted(remaining, key=lambda h: (-drops[h], h))[:tries]
        added = None
        for t, head in enumerate(order, start=1):
            remaining.remove(head)  # tried once: accepted, or not tried again
            trial = tuple(chosen) + (head,)
            if drops[head] <= 0:
                path.append(PathStep(step, t, head, drops[head], None, None, None, False, "no proxy drop"))
                continue
            rel = ppl_rel(trial)
            if not rel <= max_ppl_rel:
                path.append(PathStep(step, t, head, drops[head], None, None, rel, False, "ppl over budget"))
                continue
            scores = sample(trial)
            emt = expected_max_toxicity(scores)
            emt_drop = expected_max_toxicity(current) - emt
            ok = emt_drop > 0
            path.append(PathStep(step, t, head, drops[head], emt, emt_drop, rel, ok,
                                 "accepted" if ok else "no sampled drop"))
            if progress is not None:
                progress(f"step {step}: {head} proxy {drops[head]:+.4f}, EMT {emt_drop:+.3f}, PPL {rel:+.1%}")
            if ok:
                added, current = head, scores
                break
        if added is None:
            break
        chosen.append(added)
    return tuple(chosen), path


def head_budget(n_heads_total: int, max_head_share: float) -> int:
    """Return the most heads a set may hold: floor(share * heads) (a tiny model's budget may be 0)."""
    return int(np.floor(n_heads_total * max_head_share + 1e-9))


__all__ = ["PathStep", "greedy_select", "head_budget"]
