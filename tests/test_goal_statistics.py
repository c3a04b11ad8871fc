"""Selection logic against hand-computed values: greedy forward selection, the prompt splits, JSON-safe summaries."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from loralens.lens.evaluation.greedy_selection import greedy_select, head_budget
from loralens.warehouse.corpus import Prompt
from loralens.warehouse.json_values import json_safe
from loralens.warehouse.prompt_splits import split_challenging, text_fraction


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
