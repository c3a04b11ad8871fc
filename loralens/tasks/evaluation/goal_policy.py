"""The goal the intervene stage checks, and the condition its summary headlines.

Each ablated head set (a top-N of a score, the causally selected set, a hand-written list) is compared with the
baseline and with the random sets of its size (`loralens.lens.evaluation.controls`). A condition is *within
budget* when its
share of heads and its perplexity rise are within `goal`; it *meets the goal* when, within budget, its EMT falls
by at least `goal.emt_rel` (significantly: the paired interval is below zero) and it beats the random sets
`goal.vs_random` times over. The headline is the within-budget condition with the largest EMT drop, never one that
breaks the budget (the others are listed beside it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loralens.config import GoalConfig
from loralens.lens.evaluation.controls import versus_random

# The groups checked against the goal: every head set chosen by a method (random sets are the controls).
CHECKED = ("attributed", "selected")


def within_budget(head_share: float, ppl_rel: float | None, goal: GoalConfig) -> bool:
    """Return whether a head set is within the budget (a missing perplexity is not: it cannot be checked)."""
    return head_share <= goal.max_head_share and ppl_rel is not None and np.isfinite(ppl_rel) \
        and ppl_rel <= goal.ppl_rel


def goal_rows(conds, rows: list[dict[str, Any]], scores: dict[int, np.ndarray], n_total_heads: int,
              goal: GoalConfig, *, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Return one goal check per checked condition: budget, EMT change, its random controls, and the verdict.

    `conds` are the stage's conditions (index 0 the baseline), `rows` their metrics rows in the same order, and
    `scores[i]` condition i's toxicities `[prompts, k]`.
    """
    out = []
    for ci, c in enumerate(conds):
        if c.group not in CHECKED:
            continue
        r = rows[ci]
        randoms = [scores[i] for i, x in enumerate(conds) if x.group == "random" and len(x.heads) == len(c.heads)]
        vs = versus_random(scores[ci], scores[0], randoms, n_boot=n_boot, seed=seed)
        share = len(c.heads) / n_total_heads
        budget = within_budget(share, r["ppl_rel"], goal)
        significant = bool(r["emt_delta_high"] < 0)
        out.append({
            "condition": c.name, "group": c.group, "heads": len(c.heads), "head_share": share,
            "emt_rel": r["emt_rel"], "emt_delta": r["emt_delta"], "emt_delta_ci": [r["emt_delta_low"],
                                                                                   r["emt_delta_high"]],
            "significant": significant, "ppl_rel": r["ppl_rel"], "within_budget": budget,
            "versus_random": vs.to_dict(), "beats_random": vs.beats(goal.vs_random),
            "meets_goal": bool(budget and significant and r["emt_rel"] <= goal.emt_rel and vs.beats(goal.vs_random)),
        })
    return out


def headline(goals: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the within-budget condition with the largest EMT drop (ties: fewer heads, then name), or None."""
    ok = [g for g in goals if g["within_budget"]]
    if not ok:
        return None
    return min(ok, key=lambda g: (g["emt_delta"], g["heads"], g["condition"]))


def random_controls_note(n_random: int, wanted: int = 5) -> str:
    """Return how many random sets per size the comparison rests on, and whether that is fewer than wanted."""
    if n_random >= wanted:
        return f"{n_random} random sets per size"
    return (f"{n_random} random set{'s' if n_random != 1 else ''} per size (fewer than the {wanted} a claim needs: "
            f"the CPU default keeps its run short; set intervene.random_seeds for more)")


__all__ = ["CHECKED", "goal_rows", "headline", "random_controls_note", "within_budget"]
