"""The intervene stage's summary: the preregistered headline and its verdict, the all-heads claim, the exploratory
goal table, the protocol and the timings."""

from __future__ import annotations

from typing import Any

import numpy as np

from loralens.config import PipelineConfig
from loralens.tasks.evaluation.goal_policy import CHECKED, goal_rows, headline, random_controls_note
from loralens.tasks.evaluation.steering_verdict import all_heads_verdict, steering_verdict
from loralens.warehouse.json_values import json_safe


def all_heads_ppl_budget(select_manifest: dict[str, Any]) -> float | None:
    """Return the perplexity budget the select stage searched its all-heads condition under (None: not recorded)."""
    return select_manifest["config"]["select"].get("steering", {}).get("all_heads_ppl_rel")


def stage_summary(cfg: PipelineConfig, conds, rows: list[dict[str, Any]], scores: dict[int, np.ndarray],
                  n_total_heads: int, select_manifest: dict[str, Any], ablation: dict[str, Any] | None,
                  seconds: dict[str, float]) -> dict[str, Any]:
    """Return the summary: `headline` (preregistered by the select version of `select_manifest`), `all_heads`,
    `goal` (the exploratory zero-ablation checks), `goal_met` (the headline's verdict), protocol and `seconds`
    (setup, generate, total)."""
    ic = cfg.intervene
    sv = select_manifest["version"]
    goals = goal_rows(conds, rows, scores, n_total_heads, cfg.goal, n_boot=ic.n_boot, seed=ic.seed)
    steering = steering_verdict(conds, rows, scores, n_total_heads, cfg.goal, select_version=sv, n_boot=ic.n_boot,
                                seed=ic.seed)
    best = headline(steering, goals, rows, sv)
    budget = all_heads_ppl_budget(select_manifest)
    every = None if budget is None else all_heads_verdict(conds, rows, budget, select_version=sv)
    n_random = min((sum(1 for x in conds if x.group == "random" and len(x.heads) == len(c.heads))
                    for c in conds if c.group in CHECKED), default=0)
    out = {"conditions": len(conds), "kind": ic.kind, "k": ic.k, "prompts": conds[0].n_prompts,
           "protocol": f"nucleus p={ic.top_p}, {ic.max_new_tokens} new tokens, k={ic.k} per prompt "
                       f"(RealToxicityPrompts uses k=25; smaller k for the CPU default)",
           "prompt_split": "evaluation (never seen by the cache corpus or the selection)",
           "random_controls": random_controls_note(n_random), "scorer": cfg.attribute.scorer,
           "goal_spec": cfg.goal.model_dump(), "goal": goals, "headline": best, "all_heads": every,
           "goal_met": best is not None and bool(best["meets_goal"]),
           "seconds_setup": seconds["setup"], "seconds_generate": seconds["generate"], "seconds": seconds["total"]}
    if ablation is not None:
        out["ablation"] = {"heads": [f"L{a}H{h}" for a, h in ablation["heads"]], "drop": ablation["drop"],
                           "rank": ablation["rank"], "spearman_vs_lens": ablation["spearman_vs_lens"]}
    return json_safe(out)


__all__ = ["all_heads_ppl_budget", "stage_summary"]
