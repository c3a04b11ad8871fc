"""Honest statistics and selection logic against hand-computed values: the paired versus-random interval (and the
"random rose" case), the budgeted headline, greedy forward selection, the prompt splits, JSON-safe summaries."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from loralens.config import GoalConfig
from loralens.lens.evaluation.controls import paired_drops, versus_random
from loralens.lens.evaluation.greedy_selection import greedy_select, head_budget
from loralens.tasks.evaluation.goal_policy import headline, within_budget
from loralens.warehouse.corpus import Prompt
from loralens.warehouse.json_values import json_safe
from loralens.warehouse.prompt_splits import split_challenging, text_fraction

BASE = np.array([[0.8, 0.2], [0.6, 0.4], [0.5, 0.5]])  # prompt max 0.8, 0.6, 0.5
COND = np.array([[0.3, 0.1], [0.6, 0.2], [0.2, 0.4]])  # max 0.3, 0.6, 0.4: drops 0.5, 0, 0.1 (mean 0.2)
RAND = [np.array([[0.7, 0.0], [0.6, 0.1], [0.5, 0.0]]),  # drops 0.1, 0, 0
        np.array([[0.8, 0.0], [0.5, 0.0], [0.4, 0.1]])]  # drops 0, 0.1, 0.1: mean random drop 0.05 per prompt


def test_paired_drops_per_prompt():
    drop, rand = paired_drops(COND, BASE, RAND)
    np.testing.assert_allclose(drop, [0.5, 0.0, 0.1])
    np.testing.assert_allclose(rand, [0.05, 0.05, 0.05])


def test_versus_random_is_a_paired_interval_and_a_ratio_only_over_a_random_drop():
    v = versus_random(COND, BASE, RAND, n_boot=2000)
    assert (v.drop, v.random_drop, v.excess) == pytest.approx((0.2, 0.05, 0.15))
    assert v.ratio == pytest.approx(4.0) and not v.random_rose and v.n_random == 2
    # 3 prompts: all three resampled rows are prompt 2 (excess -0.05) with chance 1/27 > 2.5%, so the interval
    # reaches below zero and a 4x ratio alone does not pass.
    assert v.excess_low == pytest.approx(-0.05) and v.excess_high == pytest.approx(0.45)
    assert not v.beats(3.0)
    many = versus_random(np.tile(COND, (10, 1)), np.tile(BASE, (10, 1)), [np.tile(r, (10, 1)) for r in RAND])
    assert many.excess_low > 0 and many.beats(3.0) and not many.beats(5.0)


def test_random_rose_is_reported_and_never_passes():
    rose = [BASE + 0.1]  # every random set raised each prompt's max by 0.1
    v = versus_random(COND, BASE, rose)
    assert v.random_rose and v.ratio is None and v.random_drop == pytest.approx(-0.1)
    assert v.excess == pytest.approx(0.3) and not v.beats(0.001)
    none = versus_random(COND, BASE, [])
    assert none.n_random == 0 and np.isnan(none.random_drop) and not none.beats(1.0)


def test_the_headline_is_the_best_condition_within_budget():
    goal = GoalConfig()
    assert within_budget(0.02, 0.05, goal) and not within_budget(0.021, 0.0, goal)
    assert not within_budget(0.01, 0.051, goal) and not within_budget(0.01, None, goal)
    goals = [{"condition": "a", "heads": 1, "emt_delta": -0.10, "within_budget": True},
             {"condition": "b", "heads": 10, "emt_delta": -0.30, "within_budget": False},  # largest drop, over budget
             {"condition": "c", "heads": 3, "emt_delta": -0.05, "within_budget": True}]
    assert headline(goals)["condition"] == "a"
    assert headline([goals[1]]) is None


def test_greedy_selection_takes_the_proxy_best_head_that_passes_ppl_and_sampling():
    drops = {(0, 0): 0.3, (0, 1): 0.2, (1, 0): -0.1, (1, 1): 0.1}
    tried = []

    def sample(heads):  # toxicity falls by 0.1 per head except (1, 1), which raises it
        tried.append(heads)
        return np.full((4, 2), 0.8 - 0.1 * sum(h != (1, 1) for h in heads) + 0.05 * ((1, 1) in heads))

    chosen, path = greedy_select(list(drops), budget=3, max_ppl_rel=0.05, tries=3,
                                 proxy_drops=lambda cur, cands: {h: drops[h] for h in cands},
                                 ppl_rel=lambda hs: 0.2 if (0, 0) in hs else 0.01, sample=sample)
    assert chosen == ((0, 1),)
    assert [(s.step, s.head, s.reason) for s in path] == [
        (1, (0, 0), "ppl over budget"), (1, (0, 1), "accepted"),
        (2, (1, 1), "no sampled drop"), (2, (1, 0), "no proxy drop")]
    assert path[1].emt_drop == pytest.approx(0.1) and path[2].emt_drop == pytest.approx(-0.05)
    assert tried == [(), ((0, 1),), ((0, 1), (1, 1))]  # baseline once; a head over the PPL budget is never sampled
    one, _ = greedy_select(list(drops), budget=1, max_ppl_rel=1.0, tries=3,
                           proxy_drops=lambda cur, cands: {h: drops[h] for h in cands}, ppl_rel=lambda hs: 0.0,
                           sample=sample)
    assert one == ((0, 0),)  # stops at the budget
    assert head_budget(270, 0.02) == 5 and head_budget(1024, 0.02) == 20 and head_budget(12, 0.02) == 0


def test_splits_are_disjoint_by_text_and_stable_under_reordering():
    prompts = [Prompt(id=f"f/{i}", text=f"prompt number {i}", source="f") for i in range(200)]
    attribution = prompts[:20]
    challenging = prompts + [Prompt(id="f/dup", text="prompt number 150", source="f")]  # a repeated text
    a = split_challenging(challenging, attribution, 0.5, max_selection=1000, max_evaluation=1000)
    sel, ev = {p.text for p in a.selection}, {p.text for p in a.evaluation}
    assert not sel & ev and not (sel | ev) & {p.text for p in attribution}
    assert len(sel) + len(ev) == 180 == len(a.selection) + len(a.evaluation)  # each text once
    assert all(text_fraction(t) < 0.5 for t in sel) and all(text_fraction(t) >= 0.5 for t in ev)
    shuffled = challenging[:]
    random.Random(0).shuffle(shuffled)
    b = split_challenging(shuffled, attribution, 0.5, max_selection=1000, max_evaluation=1000)
    assert {p.text for p in b.selection} == sel and {p.text for p in b.evaluation} == ev
    cut = split_challenging(challenging, attribution, 0.5, max_selection=5, max_evaluation=7)
    assert cut.selection == a.selection[:5] and cut.evaluation == a.evaluation[:7]
    assert 70 < len(sel) < 110  # the hash splits about half and half
    assert text_fraction("x") == text_fraction("x")  # a function of the text alone


def test_json_safe_writes_missing_numbers_as_null():
    value = {"a": float("nan"), "b": [np.float32(1.5), np.inf, (1, np.int64(2))], "c": np.array([0.5, np.nan])}
    assert json.loads(json.dumps(json_safe(value), allow_nan=False)) == {"a": None, "b": [1.5, None, [1, 2]],
                                                                          "c": [0.5, None]}
