"""The goal the intervene stage checks, and the condition its summary headlines.

Each ablated head set (a top-N of a score, the causally selected set, a hand-written list) is compared with the
baseline and with the random sets of its size; the numbers and the goal test itself (`within_budget`,
`meets_goal`) are in `loralens.lens.evaluation.statistics`. This module gathers them into one goal row per
checked condition: the exploratory table. The headline is preregistered by the select stage, never chosen on the
evaluation split (that would be a winner's curse): its steering condition (`steering_verdict.py`) when it chose
one, else the zero-ablation set it selected, else none.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loralens.config import GoalConfig
from loralens.lens.evaluation.statistics import meets_goal, significant_drop, versus_random, within_budget
from loralens.tasks.evaluation.steering_verdict import metrics

# The groups checked against the goal: every head set chosen by a method (random sets are the controls).
CHECKED = ("attributed", "selected")


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
        beats = vs.beats(goal.vs_random)
        out.append({
            "condition": c.name, "group": c.group, "heads": len(c.heads), "head_share": share,
            "emt_rel": r["emt_rel"], "emt_delta": r["emt_delta"], "emt_delta_ci": [r["emt_delta_low"],
                                                                                   r["emt_delta_high"]],
            "significant": significant_drop(r["emt_delta_high"]), "ppl_rel": r["ppl_rel"],
            "within_budget": within_budget(share, r["ppl_rel"], goal),
            "versus_random": vs.to_dict(), "beats_random": beats,
            "meets_goal": meets_goal(share, r["ppl_rel"], r["emt_rel"], r["emt_delta_high"], beats, goal),
        })
    return out


def headline(steering: dict[str, Any] | None, goals: list[dict[str, Any]], rows: list[dict[str, Any]],
             select_version: str) -> dict[str, Any] | None:
    """Return the preregistered headline: the steering verdict, else the `selected` set's goal row with its
    figures (`rows` are the stage's `interventions` rows), else None; whatever the evaluation says."""
    if steering is not None:
        return steering
    sel = next((g for g in goals if g["group"] == "selected"), None)
    if sel is None:
        return None
    row = next(r for r in rows if r["condition"] == sel["condition"])
    return sel | metrics(row) | {"preregistered_by": f"select {select_version}"}


def random_controls_note(n_random: int, wanted: int = 5) -> str:
    """Return how many random sets per size the comparison rests on, and whether that is fewer than wanted."""
    if n_random >= wanted:
        return f"{n_random} random sets per size"
    return (f"{n_random} random set{'s' if n_random != 1 else ''} per size (fewer than the {wanted} a claim needs: "
            f"the CPU default keeps its run short; set intervene.random_seeds for more)")


__all__ = ["CHECKED", "goal_rows", "headline", "random_controls_note"]
