"""The steering search on hand-made measurements: the preregistered condition is the largest within-budget proxy
drop, ties go to fewer heads and weaker strength, and nothing over budget or without a drop is ever chosen."""

from __future__ import annotations

from loralens.lens.evaluation.steering_search import Steering, Trial, best, ranked_heads, search

A, B, C = (0, 1), (2, 3), (4, 5)


def test_ranked_heads_best_first_ties_by_head_nan_dropped():
    assert ranked_heads({B: 1.0, A: 1.0, C: float("nan"), (9, 9): 3.0}) == [(9, 9), A, B]


def test_search_picks_the_largest_drop_within_the_ppl_budget():
    # drop grows with alpha and with heads; ppl rise = 0.01 * alpha * heads; reverse is half as strong
    def measure(c: Steering) -> tuple[float, float]:
        scale = 1.0 if c.edit == "steer" else 0.5
        return scale * 0.1 * c.alpha * len(c.heads), 0.01 * c.alpha * len(c.heads)

    seen = []
    chosen, trials = search({("steer", "contrast"): [A, B, C], ("reverse", "lens"): [B]}, sizes=[1, 2, 5],
                            alphas=[1, 2, 4], max_ppl_rel=0.05, measure=measure, progress=seen.append)
    # steer: sizes 1, 2 (5 > 3 heads: skipped) x 3 alphas; reverse: size 1 x 3 alphas
    assert len(trials) == 9 and len(seen) == 9
    # within budget (0.01 * alpha * n <= 0.05): alpha * n <= 5; the largest drop 0.1 * alpha * n is alpha*n = 4:
    # (1 head, alpha 4) and (2 heads, alpha 2) tie at 0.4: fewer heads wins
    assert chosen.condition == Steering((A,), "steer", "contrast", 4.0)
    assert chosen.condition.name == "steer:contrast:a4:L0H1"
    over = [t for t in trials if not t.within_budget]
    assert {(len(t.condition.heads), t.condition.alpha) for t in over} == {(2, 4.0)}


def test_ties_go_to_the_weaker_strength_and_no_drop_is_no_choice():
    s = Steering((A,), "steer", "unembed", 2.0)
    w = Steering((A,), "steer", "unembed", 1.0)
    assert best([Trial(s, 0.3, 0.0, True), Trial(w, 0.3, 0.0, True)]).condition == w
    assert best([Trial(s, 0.0, 0.0, True), Trial(w, -0.1, 0.0, True)]) is None  # no drop: nothing to preregister
    assert best([Trial(s, 0.5, 0.2, False)]) is None  # over budget
    assert Trial(s, 0.5, 0.2, False).to_dict() == {"heads": "L0H1", "edit": "steer", "source": "unembed",
                                                   "alpha": 2.0, "name": "steer:unembed:a2:L0H1", "proxy_drop": 0.5,
                                                   "ppl_rel": 0.2, "within_budget": False, "n_heads": 1}
