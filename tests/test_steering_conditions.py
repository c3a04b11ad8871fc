"""Which conditions the intervene stage evaluates for the select stage's preregistered steering condition, built
from a select summary's records (the shipped `trial_record`) over cached layers, and each one's head edit."""

from __future__ import annotations

import pytest
import torch

from loralens.config import SteeringConfig
from loralens.lens.evaluation.steering_search import Steering, Trial
from loralens.lens.heads.head_sets import parse_head_list
from loralens.tasks.evaluation.conditions import Condition
from loralens.tasks.evaluation.steering import trial_record
from loralens.tasks.evaluation.steering_conditions import (
    STEERING,
    STEERING_ALL_HEADS,
    STEERING_EXPLORATORY,
    STEERING_RANDOM,
    STEERING_RANDOM_DIRECTION,
    EditSpec,
    intervention_of,
    preregistered_conditions,
)
from loralens.tasks.evaluation.steering_controls import MatchedControls, control_seeds, draw_random_sets

LAYERS, N_HEADS = [2, 5, 7], 4  # the cached layers (not every model layer)
EVERY = [(la, h) for la in LAYERS for h in range(N_HEADS)]
HEADLINE = Steering(((5, 1), (7, 3)), "reverse", "lens", 4.0)


def select_manifest(headline: Steering | None = HEADLINE, all_heads: bool = True, n_random: int = 20, seed: int = 0,
                    **plan) -> dict:
    """Return a select manifest as the select stage records its preregistration (summary + config); the random
    sets drawn as the stage draws them, every one within budget."""
    every = Trial(Steering(tuple(EVERY), "steer", "contrast", 0.25), 0.02, 0.05, True)
    controls = None
    if headline is not None and all(la in LAYERS for la, _ in headline.heads):
        drawn = draw_random_sets(headline, LAYERS, N_HEADS, control_seeds(seed, len(headline.heads), n_random))
        controls = MatchedControls([(h, 0.01) for h in drawn], [], 0.05).to_dict()
    steering = {"headline": None if headline is None else trial_record(Trial(headline, 0.01, 0.002, True)),
                "controls": controls,
                "all_heads": trial_record(every, all_heads=True) if all_heads else None, "labels": ">= 0.5"}
    return {"version": "sel123", "summary": {"steering": steering},
            "config": {"select": {"steering": SteeringConfig(**plan).model_dump()}}}


def test_the_preregistered_headline_its_controls_and_the_exploratory_conditions():
    conds = preregistered_conditions(select_manifest(), LAYERS, N_HEADS, seed=0)
    by_group = {}
    for c in conds:
        by_group.setdefault(c.group, []).append(c)
    assert [len(by_group[g]) for g in (STEERING, STEERING_RANDOM, STEERING_RANDOM_DIRECTION, STEERING_EXPLORATORY,
                                       STEERING_ALL_HEADS)] == [1, 20, 1, 6, 1]
    assert len({c.name for c in conds}) == len(conds)  # unique condition names
    (head,) = by_group[STEERING]
    spec = EditSpec("reverse", "lens", 4.0)
    assert head.heads == HEADLINE.heads and head.spec == spec
    assert head.name == "headline:reverse:lens:a4:L5H1,L7H3"
    randoms = by_group[STEERING_RANDOM]
    for r in randoms:
        assert len(r.heads) == 2 and r.spec == spec and not set(r.heads) & set(HEADLINE.heads)
        assert all(la in LAYERS and 0 <= h < N_HEADS for la, h in r.heads)  # drawn over the cached layers only
    assert len({r.heads for r in randoms}) > 10  # 20 seeds, 66 possible pairs: mostly different sets
    # exactly the preregistered sets, in their order
    assert [r.heads for r in randoms] == [tuple(parse_head_list(c["heads"]))
                                          for c in select_manifest()["summary"]["steering"]["controls"]["random_sets"]]
    assert conds == preregistered_conditions(select_manifest(), LAYERS, N_HEADS, seed=0)
    assert [r.heads for r in preregistered_conditions(select_manifest(seed=1), LAYERS, N_HEADS, seed=0)
            if r.group == STEERING_RANDOM] != [r.heads for r in randoms]  # select's seed drew them
    (rd,) = by_group[STEERING_RANDOM_DIRECTION]
    assert rd.heads == HEADLINE.heads and rd.spec.direction_seed is not None
    assert (rd.spec.edit, rd.spec.source, rd.spec.alpha) == ("reverse", "lens", 4.0)
    assert rd.name == "random_direction:reverse:random:a4:L5H1,L7H3"
    explored = {(c.spec.edit, c.spec.source) for c in by_group[STEERING_EXPLORATORY]}
    assert explored == {("steer", "contrast"), ("reverse", "contrast"), ("steer", "unembed"), ("reverse", "unembed"),
                        ("steer", "lens"), ("zero", None)}
    assert all(c.heads == HEADLINE.heads and c.spec.alpha in (4.0, None) for c in by_group[STEERING_EXPLORATORY])
    (every,) = by_group[STEERING_ALL_HEADS]
    assert every.heads == tuple(EVERY) and every.spec == EditSpec("steer", "contrast", 0.25)
    assert every.name == "all_heads:steer:contrast:a0.25:all"


def test_select_plans_without_a_headline_or_with_steering_off():
    only_all = preregistered_conditions(select_manifest(None), LAYERS, N_HEADS, seed=0)
    assert [c.group for c in only_all] == [STEERING_ALL_HEADS]
    narrow = preregistered_conditions(select_manifest(all_heads=False, n_random=3, sources=("lens",),
                                                      edits=("reverse",)), LAYERS, N_HEADS, seed=0)
    assert [c.key for c in narrow] == ["headline", "random0", "random1", "random2", "random_direction", "zero"]
    off = select_manifest()
    off["summary"]["steering"] = None
    assert preregistered_conditions(off, LAYERS, N_HEADS, seed=0) == []
    del off["summary"]["steering"]  # a select version from before steering
    assert preregistered_conditions(off, LAYERS, N_HEADS, seed=0) == []
    with pytest.raises(ValueError, match="outside the layers"):
        preregistered_conditions(select_manifest(Steering(((3, 0),), "steer", "lens", 1.0)), LAYERS, N_HEADS, seed=0)
    with pytest.raises(ValueError, match="edit: 'steer' needs a source"):
        EditSpec("steer")


def test_a_conditions_edit_is_versioned():
    def cond(alpha: float | None) -> Condition:
        edit = None if alpha is None else EditSpec("steer", "contrast", alpha)
        return Condition("c", STEERING, ((5, 1),), 6, 2, edit)

    assert cond(4.0).to_dict() != cond(2.0).to_dict()
    assert cond(4.0).to_dict()["edit"] == {"edit": "steer", "source": "contrast", "alpha": 4.0,
                                           "direction_seed": None}
    assert "edit" not in cond(None).to_dict()  # zero-ablation conditions hash as before


def test_each_condition_gets_its_own_heads_directions():
    g = torch.Generator().manual_seed(0)
    d_hat = {s: {la: torch.nn.functional.normalize(torch.randn(N_HEADS, 8, generator=g), dim=-1) for la in LAYERS}
             for s in ("contrast", "unembed", "lens")}
    sigma = {s: {la: torch.rand(N_HEADS, generator=g) + 0.5 for la in LAYERS} for s in d_hat}
    conds = {c.key: c for c in preregistered_conditions(select_manifest(n_random=2), LAYERS, N_HEADS, seed=0)}
    head = intervention_of(conds["headline"].heads, conds["headline"].spec, d_hat, sigma)
    assert (head.kind, head.heads, head.factor) == ("reverse", HEADLINE.heads, 4.0)
    assert torch.equal(head.z_directions[(7, 3)], d_hat["lens"][7][3])
    rand = conds["random0"]
    iv = intervention_of(rand.heads, rand.spec, d_hat, sigma)
    la, h = rand.heads[0]
    assert torch.equal(iv.z_directions[(la, h)], d_hat["lens"][la][h]) and iv.sigmas[(la, h)] == pytest.approx(
        float(sigma["lens"][la][h]))
    rd = intervention_of(conds["random_direction"].heads, conds["random_direction"].spec, d_hat, sigma)
    assert rd.heads == HEADLINE.heads and rd.sigmas[(5, 1)] == pytest.approx(float(sigma["lens"][5][1]))
    assert not torch.allclose(rd.z_directions[(5, 1)], d_hat["lens"][5][1])
    assert float(rd.z_directions[(5, 1)].norm()) == pytest.approx(1.0)
    again = intervention_of(conds["random_direction"].heads, conds["random_direction"].spec, d_hat, sigma)
    assert torch.equal(again.z_directions[(5, 1)], rd.z_directions[(5, 1)])  # seeded: the same in every process
    zero = intervention_of(conds["zero"].heads, conds["zero"].spec, None, None)
    assert (zero.kind, zero.heads) == ("zero", HEADLINE.heads)
    with pytest.raises(ValueError, match="d_hat: 'reverse' needs"):
        intervention_of(HEADLINE.heads, conds["headline"].spec, None, None)
