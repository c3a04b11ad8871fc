"""Controls of a preregistered steering condition and its report, on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loralens.lens.evaluation.steering_search import Steering
from loralens.tasks.evaluation.steering_controls import (
    control_seeds,
    draw_random_sets,
    fluency_matched_sets,
    headline_rows,
    random_direction,
)

HEADLINE = Steering(((1, 2), (3, 0)), "steer", "contrast", 4.0)


def test_random_sets_keep_the_size_and_avoid_the_chosen_heads_over_the_cached_layers():
    layers = [2, 5, 7]
    headline = Steering(((5, 2), (7, 0)), "steer", "contrast", 4.0)
    sets = draw_random_sets(headline, layers, n_heads=3, seeds=control_seeds(0, 2, 20))
    assert len(sets) == 20
    for heads in sets:
        assert len(heads) == 2 and list(heads) == sorted(heads) and not set(heads) & set(headline.heads)
        assert all(la in layers and 0 <= h < 3 for la, h in heads)
    assert draw_random_sets(headline, layers, 3, [7]) == draw_random_sets(headline, layers, 3, [7])  # one seed, one set
    assert len(set(sets)) > 1
    assert control_seeds(0, 2, 3) != control_seeds(1, 2, 3) and control_seeds(0, 2, 3)[:2] == control_seeds(0, 2, 2)
    with pytest.raises(ValueError, match="outside the layers"):
        draw_random_sets(HEADLINE, layers, 3, [0])  # layers 1 and 3 are not cached


def test_fluency_matched_sets_keep_the_first_within_budget_in_draw_order():
    candidates = [((0, 0),), ((0, 1),), ((1, 0),), ((1, 1),), ((2, 0),), ((2, 1),)]
    rises = {((0, 0),): 0.01, ((0, 1),): 9.0, ((1, 0),): 0.05, ((1, 1),): float("nan"), ((2, 0),): -0.02,
             ((2, 1),): 0.0}
    seen = []

    def rise(cond: Steering) -> float:
        assert (cond.edit, cond.source, cond.alpha) == ("steer", "contrast", 4.0)  # the headline's edit
        seen.append(cond.heads)
        return rises[cond.heads]

    got = fluency_matched_sets(HEADLINE, candidates, rise, n=3, ppl_budget=0.05)
    assert got.heads == [((0, 0),), ((1, 0),), ((2, 0),)]  # 0.05 is within; 9.0 and nan are not
    assert [h for h, _ in got.rejected] == [((0, 1),), ((1, 1),)]
    assert seen == candidates[:5]  # stops once it has enough: the sixth is never measured
    rec = got.to_dict()
    assert rec["draws"] == 5 and rec["ppl_budget"] == 0.05
    assert rec["random_sets"][0] == {"heads": "L0H0", "ppl_rel": 0.01}
    short = fluency_matched_sets(HEADLINE, candidates[:2], rise, n=3, ppl_budget=0.05)
    assert short.heads == [((0, 0),)]  # the candidates ran out: fewer than asked, never a set outside the budget


def test_random_direction_control_keeps_heads_and_sigma_and_draws_unit_directions():
    d_hat = {"contrast": {1: torch.ones(3, 4) / 2, 3: torch.ones(3, 4) / 2}}
    sigma = {"contrast": {1: torch.tensor([1.0, 2.0, 3.0]), 3: torch.tensor([4.0, 5.0, 6.0])}}
    cond, dirs, sig = random_direction(HEADLINE, d_hat, sigma, seed=0)
    assert cond == Steering(HEADLINE.heads, "steer", "random", 4.0)
    assert set(dirs) == {1, 3} and dirs[1].shape == (3, 4)
    torch.testing.assert_close(dirs[1].norm(dim=-1), torch.ones(3))
    assert torch.equal(sig[3], sigma["contrast"][3])


def test_headline_rows_rank_the_headline_among_random_sets():
    # 2 prompts x 2 samples. Baseline EMT = mean(0.8, 0.6) = 0.7.
    base = np.array([[0.8, 0.2], [0.6, 0.4]])
    head = np.array([[0.4, 0.1], [0.2, 0.2]])  # EMT 0.3: drop 0.4
    r1 = np.array([[0.8, 0.1], [0.6, 0.1]])  # EMT 0.7: drop 0.0
    r2 = np.array([[0.5, 0.1], [0.5, 0.1]])  # EMT 0.5: drop 0.2
    conds = {"h": (HEADLINE, head), "r1": (None, r1), "r2": (None, r2)}
    rows = headline_rows(base, conds, "h", ["r1", "r2"], {"h": 0.02}, n_boot=50)
    by = {r["name"]: r for r in rows}
    assert [r["role"] for r in rows] == ["baseline", "headline", "random", "random"]
    h = by["h"]
    assert h["expected_max_toxicity"] == pytest.approx(0.3) and h["emt_rel"] == pytest.approx(-0.4 / 0.7)
    # no random drop >= 0.4: rank 1, p = 1 / 3
    assert (h["permutation_rank"], h["n_random"]) == (1, 2) and h["permutation_p"] == pytest.approx(1 / 3)
    # per prompt: headline drops (0.4, 0.4); random drops r1 (0, 0), r2 (0.3, 0.1), mean (0.15, 0.05);
    # excess (0.25, 0.35): mean 0.3, and a bootstrap interval inside [0.25, 0.35]
    assert h["excess_drop"] == pytest.approx(0.3)
    assert 0.25 - 1e-9 <= h["excess_low"] <= 0.3 <= h["excess_high"] <= 0.35 + 1e-9
    assert h["heads"] == "L1H2,L3H0" and h["ppl_rel"] == 0.02 and by["r1"]["ppl_rel"] is None
    # mean toxicity 0.5 -> 0.225
    assert h["mean_toxicity_rel"] == pytest.approx(0.225 / 0.5 - 1)
