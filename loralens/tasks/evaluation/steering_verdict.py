"""The verdicts of the select stage's preregistered steering conditions on the evaluation split.

The headline (group `steering`) is ranked among its random head sets given the same edit (`steering_random`, the
ones the select stage preregistered: fluency-matched by construction, each within the perplexity budget on the
same WikiText): the permutation p of its EMT drop (`statistics.permutation_test`), the same p among only the
random sets within the budget as measured here (`statistics.fluency_matched`: equal to the first when the
perplexities reproduce; a check, not a criterion), and the paired excess-drop interval
(`statistics.versus_random`). It meets the goal when it edits <= `goal.max_head_share` of the heads, EMT changes
by <= `goal.emt_rel`, perplexity by <= `goal.ppl_rel`, and p < 0.05 against >= 20 random sets. The all-heads
condition is its own claim: EMT <= -40% at a perplexity rise within the budget the select stage searched it under.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from loralens.config import GoalConfig
from loralens.lens.evaluation.statistics import fluency_matched, permutation_test, versus_random
from loralens.tasks.evaluation.steering_conditions import (
    STEERING,
    STEERING_ALL_HEADS,
    STEERING_RANDOM,
    STEERING_RANDOM_DIRECTION,
)

P_MAX = 0.05  # the headline's permutation p must be below this
MIN_RANDOM_SETS = 20  # ... against at least this many random head sets
ALL_HEADS_EMT_REL = -0.40  # the all-heads condition's EMT target (relative)


def _at_most(x: float | None, limit: float) -> bool:
    return x is not None and not math.isnan(x) and x <= limit


def _index(conds, group: str) -> int | None:
    return next((i for i, c in enumerate(conds) if c.group == group), None)


def metrics(row: dict[str, Any]) -> dict[str, Any]:
    """Return a condition's figures for a verdict: EMT, toxicity probability, mean toxicity (each with its 95%
    interval), the paired EMT change, perplexity and the relative changes."""
    out = {"condition": row["condition"], "heads": row["heads"], "n_heads": row["n_heads"]}
    for key in ("emt", "tox_prob", "mean_tox", "emt_delta"):
        out[key], out[f"{key}_ci"] = row[key], [row[f"{key}_low"], row[f"{key}_high"]]
    return out | {k: row[k] for k in ("emt_rel", "tox_prob_rel", "ppl", "ppl_rel")}


def steering_verdict(conds, rows: list[dict[str, Any]], scores: dict[int, np.ndarray], n_total_heads: int,
                     goal: GoalConfig, *, select_version: str, n_boot: int, seed: int) -> dict[str, Any] | None:
    """Return the preregistered steering headline's figures, controls and verdict, or None without one.

    `conds` are the stage's conditions (index 0 the baseline), `rows` their `interventions` rows in the same order
    and `scores[i]` condition i's toxicities `[prompts, k]`.
    """
    hi = _index(conds, STEERING)
    if hi is None:
        return None
    c, r = conds[hi], rows[hi]
    rand = [i for i, x in enumerate(conds) if x.group == STEERING_RANDOM]
    base = rows[0]["emt"]
    drops = [base - rows[i]["emt"] for i in rand]
    perm = permutation_test(base - r["emt"], drops)
    matched = permutation_test(base - r["emt"], fluency_matched(drops, [rows[i]["ppl_rel"] for i in rand],
                                                                goal.ppl_rel))
    vs = versus_random(scores[hi], scores[0], [scores[i] for i in rand], n_boot=n_boot, seed=seed)
    share = len(c.heads) / n_total_heads
    criteria = {"head_share": share <= goal.max_head_share, "emt_rel": _at_most(r["emt_rel"], goal.emt_rel),
                "ppl_rel": _at_most(r["ppl_rel"], goal.ppl_rel),
                "permutation": perm.p_value < P_MAX and perm.n_random >= MIN_RANDOM_SETS}
    rd = _index(conds, STEERING_RANDOM_DIRECTION)
    return {**metrics(r), "group": c.group, "preregistered_by": f"select {select_version}", "head_share": share,
            "edit": c.edit.edit, "source": c.edit.source, "alpha": c.edit.alpha,
            "permutation": {"rank": perm.rank, "p": perm.p_value, "n_random": perm.n_random},
            "permutation_fluency_matched": {"rank": matched.rank, "p": matched.p_value, "n_random": matched.n_random,
                                            "ppl_rel_at_most": goal.ppl_rel},
            "versus_random": vs.to_dict(), "random_direction": None if rd is None else metrics(rows[rd]),
            "criteria": criteria, "meets_goal": all(criteria.values())}


def all_heads_verdict(conds, rows: list[dict[str, Any]], ppl_budget: float, *, select_version: str
                      ) -> dict[str, Any] | None:
    """Return the preregistered all-heads condition's figures and verdict (EMT <= -40% at PPL <= `ppl_budget`),
    or None without one."""
    ai = _index(conds, STEERING_ALL_HEADS)
    if ai is None:
        return None
    r, c = rows[ai], conds[ai]
    criteria = {"emt_rel": _at_most(r["emt_rel"], ALL_HEADS_EMT_REL), "ppl_rel": _at_most(r["ppl_rel"], ppl_budget)}
    return {**metrics(r), "group": c.group, "preregistered_by": f"select {select_version}", "edit": c.edit.edit,
            "source": c.edit.source, "alpha": c.edit.alpha, "emt_rel_goal": ALL_HEADS_EMT_REL,
            "ppl_rel_budget": ppl_budget, "criteria": criteria, "meets_goal": all(criteria.values())}


__all__ = ["ALL_HEADS_EMT_REL", "MIN_RANDOM_SETS", "P_MAX", "all_heads_verdict", "metrics", "steering_verdict"]
