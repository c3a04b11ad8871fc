"""The statistics module, and the goal and metrics rows built from it, against hand-computed values.

Each expected number is worked out in the comment beside it. The bootstrap has no closed form, so its tests use
cases whose interval is exact: constant rows (zero width), and two prompts, where a resample of only the first
(or only the second) prompt has chance 1/4 > 2.5%, so the 95% interval runs exactly from one to the other.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from loralens.config import GoalConfig, InterveneConfig
from loralens.lens.evaluation.statistics import (
    Permutation,
    bootstrap_ci,
    descending_ranks,
    expected_max_toxicity,
    fluency_matched,
    mean_toxicity,
    mean_toxicity_drops,
    meets_goal,
    metric_table,
    paired_drops,
    paired_interval,
    permutation_test,
    prompt_max,
    relative_change,
    significant_drop,
    toxicity_probability,
    versus_random,
    within_budget,
)
from loralens.tasks.evaluation.conditions import Condition
from loralens.tasks.evaluation.goal_policy import goal_rows, headline, random_controls_note
from loralens.tasks.evaluation.intervene_metrics import condition_row, sampled_ablation_scores

SCORES = np.array([[0.1, 0.6], [0.2, 0.3], [0.9, 0.95]])
TWO = np.array([[0.2], [0.6]])  # two prompts, k = 1: every resample's EMT lies in [0.2, 0.6]

BASE = np.array([[0.8, 0.2], [0.6, 0.4], [0.5, 0.5]])  # prompt max 0.8, 0.6, 0.5
COND = np.array([[0.3, 0.1], [0.6, 0.2], [0.2, 0.4]])  # max 0.3, 0.6, 0.4: drops 0.5, 0, 0.1 (mean 0.2)
RAND = [np.array([[0.7, 0.0], [0.6, 0.1], [0.5, 0.0]]),  # drops 0.1, 0, 0
        np.array([[0.8, 0.0], [0.5, 0.0], [0.4, 0.1]])]  # drops 0, 0.1, 0.1: mean random drop 0.05 per prompt


def tiled(a: np.ndarray, times: int = 10) -> np.ndarray:
    """Return `a` [prompts, k] repeated `times` over prompts."""
    return np.tile(a, (times, 1))


# --- RTP metrics --------------------------------------------------------------------------------------------------


def test_metrics_by_hand():
    assert expected_max_toxicity([[0.1, 0.9], [0.4, 0.2]]) == pytest.approx(0.65)  # (0.9 + 0.4) / 2
    assert toxicity_probability([[0.1, 0.9], [0.4, 0.2]]) == pytest.approx(0.5)  # only prompt 0 reaches 0.5
    assert mean_toxicity([[0.1, 0.9], [0.4, 0.2]]) == pytest.approx(0.4)  # 1.6 / 4
    assert expected_max_toxicity(SCORES) == pytest.approx((0.6 + 0.3 + 0.95) / 3)
    assert toxicity_probability(SCORES) == pytest.approx(2 / 3)
    assert toxicity_probability(SCORES, threshold=0.92) == pytest.approx(1 / 3)
    assert mean_toxicity(SCORES) == pytest.approx((0.1 + 0.6 + 0.2 + 0.3 + 0.9 + 0.95) / 6)
    np.testing.assert_allclose(prompt_max(SCORES), [0.6, 0.3, 0.95])


def test_threshold_is_inclusive():
    assert toxicity_probability(np.array([[0.5, 0.1], [0.49, 0.2]]), threshold=0.5) == pytest.approx(0.5)


def test_rejects_wrong_shapes():
    for fn in (expected_max_toxicity, toxicity_probability, mean_toxicity, prompt_max):
        for bad in (np.zeros(3), np.zeros((0, 2)), np.zeros((2, 0))):
            with pytest.raises(ValueError, match=r"\[prompts, k\]"):
                fn(bad)


# --- Bootstrap ----------------------------------------------------------------------------------------------------


def test_bootstrap_two_prompts_spans_them_exactly():
    # Resamples of TWO: (0.2, 0.2) -> 0.2 and (0.6, 0.6) -> 0.6 have chance 1/4 each, so the 2.5% and 97.5%
    # quantiles of 1000 resamples are those two values.
    assert bootstrap_ci(TWO, expected_max_toxicity, n_boot=1000, seed=0) == pytest.approx((0.2, 0.6))
    assert bootstrap_ci(TWO, mean_toxicity, n_boot=1000, seed=5) == pytest.approx((0.2, 0.6))


def test_bootstrap_deterministic_and_contains_estimate():
    s = np.random.default_rng(1).random((200, 5))
    a = bootstrap_ci(s, expected_max_toxicity, n_boot=300, seed=7)
    assert a == bootstrap_ci(s, expected_max_toxicity, n_boot=300, seed=7)
    assert a != bootstrap_ci(s, expected_max_toxicity, n_boot=300, seed=8)
    assert a[0] <= expected_max_toxicity(s) <= a[1]
    assert a[0] < a[1]


def test_bootstrap_batched_equals_looped():
    s = np.random.default_rng(2).random((50, 4))
    looped = bootstrap_ci(s, mean_toxicity, n_boot=200, seed=3)
    batched = bootstrap_ci(s, lambda x: x.mean(axis=(-2, -1)), n_boot=200, seed=3, batched=True)
    assert looped == pytest.approx(batched, abs=1e-12)


def test_bootstrap_narrows_with_more_prompts():
    rng = np.random.default_rng(4)
    small, large = rng.random((20, 5)), rng.random((2000, 5))
    lo_s, hi_s = bootstrap_ci(small, expected_max_toxicity, n_boot=200, seed=0)
    lo_l, hi_l = bootstrap_ci(large, expected_max_toxicity, n_boot=200, seed=0)
    assert hi_l - lo_l < (hi_s - lo_s) / 3


def test_bootstrap_equal_rows_give_zero_width():
    s = np.tile([[0.2, 0.7, 0.4]], (30, 1))
    for fn in (expected_max_toxicity, toxicity_probability, mean_toxicity):
        lo, hi = bootstrap_ci(s, fn, n_boot=100, seed=0)
        assert lo == hi == pytest.approx(fn(s))


def test_bootstrap_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(TWO, mean_toxicity, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(TWO, mean_toxicity, alpha=1.0)


def test_metric_table_by_hand():
    s = np.tile([[0.2, 0.7, 0.4]], (5, 1))  # equal rows: every interval is the point, zero width
    t = metric_table(s, n_boot=50, seed=0)
    assert t["n_prompts"] == 5 and t["k"] == 3
    for name, value in (("expected_max_toxicity", 0.7), ("toxicity_probability", 1.0), ("mean_toxicity", 1.3 / 3)):
        assert t[name] == t[f"{name}_low"] == t[f"{name}_high"] == pytest.approx(value)
    assert metric_table(s, threshold=0.8, n_boot=50)["toxicity_probability"] == 0.0  # nothing reaches 0.8
    assert metric_table(TWO, n_boot=1000)["expected_max_toxicity_low"] == pytest.approx(0.2)  # two prompts: exact


def test_metric_table():
    s = np.random.default_rng(5).random((40, 3))
    t = metric_table(s, threshold=0.8, n_boot=200, seed=1)
    assert t["n_prompts"] == 40 and t["k"] == 3
    assert t["expected_max_toxicity"] == pytest.approx(expected_max_toxicity(s))
    assert t["toxicity_probability"] == pytest.approx(toxicity_probability(s, 0.8))
    assert t["mean_toxicity"] == pytest.approx(mean_toxicity(s))
    for name in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"):
        assert t[f"{name}_low"] <= t[name] <= t[f"{name}_high"]
    # Same seed and data -> the same interval as a direct (looped) bootstrap.
    lo, hi = bootstrap_ci(s, lambda x: toxicity_probability(x, 0.8), n_boot=200, seed=1)
    assert (t["toxicity_probability_low"], t["toxicity_probability_high"]) == pytest.approx((lo, hi))
    assert metric_table(s, threshold=0.8, n_boot=200, seed=1) == t


def test_paired_interval_keeps_each_prompt_with_its_baseline():
    # Every prompt's max falls by exactly 0.1 (0.8 -> 0.7, 0.6 -> 0.5, 0.5 -> 0.4): whatever prompts a resample
    # draws, the EMT change is -0.1, so the paired interval has zero width (unpaired, it would not).
    cond = np.array([[0.7, 0.1], [0.5, 0.3], [0.4, 0.4]])
    assert paired_interval(cond, BASE, n_boot=200) == pytest.approx((-0.1, -0.1))
    assert paired_interval(BASE - 0.1, BASE, mean_toxicity, n_boot=200) == pytest.approx((-0.1, -0.1))
    # Two prompts with changes 0 and -0.4: the interval runs from -0.4 (only prompt 1) to 0 (only prompt 0).
    assert paired_interval(np.array([[0.5], [0.5]]), np.array([[0.5], [0.9]]), n_boot=1000) \
        == pytest.approx((-0.4, 0.0))
    with pytest.raises(ValueError, match="same"):
        paired_interval(COND[:2], BASE)


# --- Random-set controls ------------------------------------------------------------------------------------------


def test_paired_drops_per_prompt():
    drop, rand = paired_drops(COND, BASE, RAND)
    np.testing.assert_allclose(drop, [0.5, 0.0, 0.1])
    np.testing.assert_allclose(rand, [0.05, 0.05, 0.05])
    drop, rand = paired_drops(COND, BASE, [])
    np.testing.assert_allclose(drop, [0.5, 0.0, 0.1])
    assert np.isnan(rand).all() and rand.shape == (3,)
    with pytest.raises(ValueError, match="3 prompts"):
        paired_drops(COND, BASE, [RAND[0][:2]])
    with pytest.raises(ValueError, match="3 prompts"):
        paired_drops(COND[:2], BASE, [])


def test_versus_random_is_a_paired_interval_and_a_ratio_only_over_a_random_drop():
    v = versus_random(COND, BASE, RAND, n_boot=2000)
    assert (v.drop, v.random_drop, v.excess) == pytest.approx((0.2, 0.05, 0.15))
    assert v.ratio == pytest.approx(4.0) and not v.random_rose and v.n_random == 2
    # 3 prompts: all three resampled rows are prompt 2 (excess -0.05) with chance 1/27 > 2.5%, so the interval
    # reaches below zero and a 4x ratio alone does not pass.
    assert v.excess_low == pytest.approx(-0.05) and v.excess_high == pytest.approx(0.45)
    assert not v.beats(3.0)
    many = versus_random(tiled(COND), tiled(BASE), [tiled(r) for r in RAND])
    assert many.excess_low > 0 and many.beats(3.0) and not many.beats(5.0)
    assert v.to_dict()["ratio"] == v.ratio and v.to_dict()["n_random"] == 2


def test_random_rose_is_reported_and_never_passes():
    rose = [BASE + 0.1]  # every random set raised each prompt's max by 0.1
    v = versus_random(COND, BASE, rose)
    assert v.random_rose and v.ratio is None and v.random_drop == pytest.approx(-0.1)
    assert v.excess == pytest.approx(0.3) and not v.beats(0.001)
    flat = versus_random(COND, BASE, [BASE.copy()])  # a random drop of exactly 0 is no drop: no ratio either
    assert flat.random_drop == 0.0 and flat.random_rose and flat.ratio is None and not flat.beats(0.001)
    none = versus_random(COND, BASE, [])
    assert none.n_random == 0 and np.isnan(none.random_drop) and not none.beats(1.0)


def test_permutation_test_ranks_the_drop_among_random_drops():
    # 0.3 against 0.1, 0.3, 0.5: two random drops are >= 0.3 (a tie counts against), rank 3, p = 3 / 4.
    assert permutation_test(0.3, [0.1, 0.3, 0.5]) == Permutation(rank=3, p_value=0.75, n_random=3)
    # Above all 19 random drops: rank 1, p = 1 / 20, the smallest p 19 sets can give.
    assert permutation_test(0.9, [0.1] * 19) == (1, 0.05, 19)
    assert permutation_test(-0.2, [-0.1, 0.0]) == (3, 1.0, 2)  # below both: p = 3 / 3
    assert permutation_test(0.2, []) == (1, 1.0, 0)  # nothing to beat: no evidence
    with pytest.raises(ValueError, match="numbers"):
        permutation_test(float("nan"), [0.1])
    with pytest.raises(ValueError, match="numbers"):
        permutation_test(0.1, [0.1, float("nan")])


def test_fluency_matched_keeps_only_random_sets_within_the_perplexity_budget():
    # Drops 0.5 (PPL +900%: a broken model), 0.1 (+1%), 0.2 (+5%, at the budget), 0.4 (unknown PPL), 0.05 (nan).
    drops, ppl = [0.5, 0.1, 0.2, 0.4, 0.05], [9.0, 0.01, 0.05, None, float("nan")]
    assert fluency_matched(drops, ppl, 0.05) == [0.1, 0.2]
    # A drop of 0.3 ranks 3rd of 5 random sets (p = 3/6), but 1st of the 2 fluency-matched ones (p = 1/3).
    assert permutation_test(0.3, drops) == (3, pytest.approx(3 / 6), 5)
    assert permutation_test(0.3, fluency_matched(drops, ppl, 0.05)) == (1, pytest.approx(1 / 3), 2)
    with pytest.raises(ValueError):
        fluency_matched(drops, ppl[:2], 0.05)  # one perplexity per random set


# --- Changes, drops and ranks -------------------------------------------------------------------------------------


def test_relative_change():
    assert relative_change(0.3, 0.4) == pytest.approx(-0.25)
    assert relative_change(0.5, 0.25) == pytest.approx(1.0)
    assert relative_change(-0.5, -1.0) == pytest.approx(-0.5)  # (-0.5 + 1) / -1
    assert math.isnan(relative_change(0.1, 0.0))
    assert math.isnan(relative_change(0.0, 0.0))
    assert math.isnan(relative_change(float("nan"), 0.3))
    assert math.isnan(relative_change(0.3, float("nan")))
    assert math.isnan(relative_change(0.1, 1e-12)) and math.isnan(relative_change(0.1, -1e-12))  # near zero
    assert relative_change(0.2, 1e-3, tol=1e-4) == pytest.approx(199.0)
    assert math.isnan(relative_change(0.2, 1e-3, tol=1e-2))


def test_mean_toxicity_drops_and_descending_ranks():
    # Baseline mean 0.5; conditions' means 0.3 and 0.6: drops 0.2 and -0.1.
    drops = mean_toxicity_drops(np.array([[0.4, 0.6]]), [np.array([[0.2, 0.4]]), np.array([[0.5, 0.7]])])
    np.testing.assert_allclose(drops, [0.2, -0.1])
    # Largest first; the tied 0.3s keep their order (index 1 before index 2).
    assert descending_ranks(np.array([0.1, 0.3, 0.3, -0.2])).tolist() == [3, 1, 2, 4]


# --- The goal -----------------------------------------------------------------------------------------------------


def test_within_budget():
    goal = GoalConfig()  # at most 2% of the heads, perplexity up at most 5%
    assert within_budget(0.02, 0.05, goal) and not within_budget(0.021, 0.0, goal)
    assert not within_budget(0.01, 0.051, goal) and not within_budget(0.01, None, goal)
    assert not within_budget(0.01, float("nan"), goal) and not within_budget(0.01, float("inf"), goal)
    assert within_budget(0.01, -0.3, goal)  # perplexity fell


def test_significant_drop_and_meets_goal():
    assert significant_drop(-0.001) and not significant_drop(0.0) and not significant_drop(float("nan"))
    goal = GoalConfig()  # EMT at least 25% down, 3x the random sets
    ok = dict(head_share=0.01, ppl_rel=0.01, emt_rel=-0.3, emt_delta_high=-0.01, beats_random=True, goal=goal)
    assert meets_goal(**ok) and meets_goal(**(ok | {"emt_rel": -0.25}))  # exactly the goal passes
    for broken in ({"head_share": 0.03}, {"ppl_rel": 0.06}, {"ppl_rel": None}, {"emt_rel": -0.2},
                   {"emt_rel": float("nan")}, {"emt_delta_high": 0.01}, {"beats_random": False}):
        assert not meets_goal(**(ok | broken)), broken


def _goal_inputs():
    """Return (conds, rows, scores) of a hand-built intervene stage: 30 prompts, k = 2."""
    conds = [Condition("baseline", "baseline", (), 30, 2),
             Condition("top1", "attributed", ((0, 1),), 30, 2),
             Condition("random1:s0", "random", ((2, 3),), 30, 2),
             Condition("random1:s1", "random", ((4, 5),), 30, 2),
             Condition("sel", "selected", ((0, 1), (1, 1)), 30, 2),
             Condition("random2:s0", "random", ((1, 0), (2, 0)), 30, 2)]
    scores = dict(enumerate([tiled(BASE), tiled(COND), tiled(RAND[0]), tiled(RAND[1]), tiled(COND),
                             tiled(BASE + 0.1)]))  # the size-2 random set raised every prompt's max by 0.1
    checked = {"emt_rel": -0.3, "emt_delta": -0.2, "emt_delta_low": -0.3, "emt_delta_high": -0.1, "ppl_rel": 0.01}
    rows = [{}, checked, {}, {}, checked | {"ppl_rel": 0.2}, {}]  # unchecked rows are never read
    return conds, rows, scores


def test_goal_rows_check_each_chosen_head_set_against_its_random_sets():
    conds, rows, scores = _goal_inputs()
    top1, sel = goal_rows(conds, rows, scores, 50, GoalConfig(), n_boot=1000, seed=0)  # baseline, randoms skipped
    assert (top1["condition"], top1["group"], top1["heads"]) == ("top1", "attributed", 1)
    assert top1["head_share"] == pytest.approx(0.02)  # 1 of 50 heads
    assert top1["emt_delta_ci"] == [-0.3, -0.1] and top1["significant"] and top1["within_budget"]
    v = top1["versus_random"]  # the two size-1 random sets only: drops 0.2 vs 0.05 (see COND, RAND)
    assert (v["drop"], v["random_drop"], v["ratio"], v["n_random"]) == pytest.approx((0.2, 0.05, 4.0, 2))
    assert top1["beats_random"] and top1["meets_goal"]
    assert (sel["condition"], sel["heads"]) == ("sel", 2) and sel["head_share"] == pytest.approx(0.04)
    assert not sel["within_budget"] and sel["versus_random"]["n_random"] == 1  # the size-2 set only
    assert sel["versus_random"]["random_rose"] and not sel["beats_random"] and not sel["meets_goal"]
    strict = goal_rows(conds, rows, scores, 50, GoalConfig(vs_random=5.0), n_boot=1000, seed=0)[0]
    assert not strict["beats_random"] and not strict["meets_goal"]  # 4x is not 5x


def test_the_headline_is_preregistered_never_the_best_on_the_evaluation_split():
    """The selected set heads the summary although an attributed set dropped EMT more on the evaluation split; a
    steering verdict, when present, heads it instead; with neither there is no headline."""
    conds, _, scores = _goal_inputs()
    scores[4] = tiled(RAND[0])  # the selected set: a smaller drop (0.033) than top1's (0.2)
    ic = InterveneConfig(n_boot=50)
    rows = [condition_row(c, scores[i], scores[0], 10.0, 10.0, "zero", ic) for i, c in enumerate(conds)]
    goals = goal_rows(conds, rows, scores, 50, GoalConfig(max_head_share=0.05), n_boot=50, seed=0)
    assert {g["condition"]: g["within_budget"] for g in goals} == {"top1": True, "sel": True}
    assert min(goals, key=lambda g: g["emt_delta"])["condition"] == "top1"
    best = headline(None, goals, rows, "v123")
    assert best["condition"] == "sel" and best["preregistered_by"] == "select v123"
    assert best["heads"] == "L0H1,L1H1" and best["emt"] == rows[4]["emt"]
    assert best["emt_ci"] == [rows[4]["emt_low"], rows[4]["emt_high"]] and best["meets_goal"] is False
    steering = {"condition": "headline:steer:contrast:a4:L0H1", "meets_goal": True}
    assert headline(steering, goals, rows, "v123") is steering
    assert headline(None, [g for g in goals if g["group"] != "selected"], rows, "v123") is None


def test_random_controls_note():
    assert random_controls_note(5) == "5 random sets per size"
    assert random_controls_note(1).startswith("1 random set per size (fewer than the 5 a claim needs")
    assert random_controls_note(2, wanted=3).startswith("2 random sets per size (fewer than the 3")


# --- The intervene stage's rows -----------------------------------------------------------------------------------


def test_condition_row_by_hand():
    ic = InterveneConfig(n_boot=50)
    c = Condition("top2:x", "attributed", ((3, 1), (5, 0)), 4, 2)
    # Equal rows: every interval has zero width. EMT 0.6 vs 0.8 (-0.2, -25%), both prompts reach 0.5 in both,
    # mean toxicity 0.35, perplexity 21 vs 20 (+5%).
    row = condition_row(c, np.tile([[0.6, 0.1]], (4, 1)), np.tile([[0.8, 0.2]], (4, 1)), 21.0, 20.0, "mean", ic)
    assert {k: row[k] for k in ("condition", "grp", "kind", "heads", "n_heads", "n_prompts", "k")} == {
        "condition": "top2:x", "grp": "attributed", "kind": "mean", "heads": "L3H1,L5H0", "n_heads": 2,
        "n_prompts": 4, "k": 2}
    expected = {"emt": 0.6, "tox_prob": 1.0, "mean_tox": 0.35, "emt_delta": -0.2}
    for name, value in expected.items():
        assert row[name] == row[f"{name}_low"] == row[f"{name}_high"] == pytest.approx(value), name
    assert (row["emt_rel"], row["tox_prob_rel"], row["ppl"], row["ppl_rel"]) == pytest.approx((-0.25, 0.0, 21.0, 0.05))
    # A single-head ablation is plain removal whatever the kind; no perplexity -> no change; a baseline toxicity
    # probability of 0 gives no relative change.
    abl = condition_row(Condition("ablate:L0H0", "ablation", ((0, 0),), 4, 2), np.full((4, 2), 0.1),
                        np.full((4, 2), 0.3), None, 20.0, "mean", ic)
    assert abl["kind"] == "zero" and abl["ppl"] is None and abl["ppl_rel"] is None
    assert abl["emt_rel"] == pytest.approx(-2 / 3) and math.isnan(abl["tox_prob_rel"])  # (0.1 - 0.3) / 0.3
    mixed = condition_row(c, BASE - 0.1, BASE, 20.0, 20.0, "zero", ic)  # per prompt -0.1: paired, zero width
    assert mixed["emt_low"] < mixed["emt"] < mixed["emt_high"] and mixed["ppl_rel"] == 0.0
    assert mixed["emt_delta_low"] == pytest.approx(-0.1) and mixed["emt_delta_high"] == pytest.approx(-0.1)


def test_sampled_ablation_scores_by_hand():
    conds = [Condition("baseline", "baseline", (), 4, 2), Condition("ablation:baseline", "ablation_baseline", (), 2, 2)]
    conds += [Condition(f"ablate:L{layer}H{head}", "ablation", ((layer, head),), 2, 2)
              for layer, head in ((1, 0), (0, 2), (2, 1))]  # in the ranking's order
    assert sampled_ablation_scores("v", conds[:2], {}) is None
    # Ablation baseline mean 0.5 (not the main baseline's 0.9); ablated means 0.4, 0.2, 0.3 -> drops 0.1, 0.3, 0.2.
    scores = {0: np.full((4, 2), 0.9), 1: np.tile([[0.4, 0.6]], (2, 1)), 2: np.full((2, 2), 0.4),
              3: np.full((2, 2), 0.2), 4: np.tile([[0.2, 0.4]], (2, 1))}
    out = sampled_ablation_scores("v", conds, scores)
    assert out["heads"] == [(1, 0), (0, 2), (2, 1)]
    np.testing.assert_allclose(out["drop"], [0.1, 0.3, 0.2])
    assert out["rank"] == [3, 1, 2]
    # Spearman of the lens order (ranks 3, 2, 1 as scores) with the drops' ranks (1, 3, 2): d = 2, -1, -1,
    # rho = 1 - 6 * 6 / (3 * (9 - 1)) = -0.5.
    assert out["spearman_vs_lens"] == pytest.approx(-0.5)
    t = out["table"].to_pydict()
    assert t["layer"] == [1, 0, 2] and t["head"] == [0, 2, 1] and t["rank"] == [3, 1, 2]
    assert t["version"] == ["v"] * 3 and t["method"] == ["ablation"] * 3
    np.testing.assert_allclose(t["score"], [0.1, 0.3, 0.2])
