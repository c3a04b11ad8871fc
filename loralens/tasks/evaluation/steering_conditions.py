"""Which conditions evaluate a preregistered steering condition, and each one's head edit.

`steering_conditions` is the one place that decides them, for the intervene stage and the steering benchmark alike:
the headline; the random head sets of its size the select stage preregistered with it (fluency-matched:
`steering_controls.fluency_matched_sets`), each with the same edit, direction source and strength and its own
heads' directions; the headline's heads along random unit
directions of the source's sigma; every other (source, edit) at the same heads and strength and zero ablation of
them (exploratory); and the preregistered all-heads condition. `EditSpec` is a condition's own edit (versioned with
the condition); `intervention_of` turns it into the `HeadIntervention` given the select stage's directions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralens.lens.evaluation.generation import hash_seed
from loralens.lens.evaluation.steering_search import Steering
from loralens.lens.heads.edits import HeadIntervention
from loralens.lens.heads.head_sets import Head, format_heads, parse_head_list
from loralens.tasks.evaluation.steering import ALL, Directions, condition_from_record, intervention
from loralens.tasks.evaluation.steering_controls import RANDOM_SOURCE, random_direction, require_in_layers
from loralens.warehouse.steering_directions import read_directions

# The intervene stage's groups of a steering evaluation (the headline first).
STEERING = "steering"
STEERING_RANDOM = "steering_random"
STEERING_RANDOM_DIRECTION = "steering_random_direction"
STEERING_EXPLORATORY = "steering_exploratory"
STEERING_ALL_HEADS = "steering_all_heads"
STEERING_GROUPS = (STEERING, STEERING_RANDOM, STEERING_RANDOM_DIRECTION, STEERING_EXPLORATORY, STEERING_ALL_HEADS)


@dataclass(frozen=True)
class EditSpec:
    """A condition's own edit: `zero`, or `steer` / `reverse` along `source`'s per-head directions at strength
    `alpha`; with `direction_seed`, random unit directions drawn from that seed, with `source`'s sigmas."""

    edit: str
    source: str | None = None
    alpha: float | None = None
    direction_seed: int | None = None

    def __post_init__(self) -> None:
        if self.edit not in ("zero", "steer", "reverse"):
            raise ValueError(f"edit: expected zero, steer or reverse, got '{self.edit}'")
        if self.edit != "zero" and (self.source is None or self.alpha is None):
            raise ValueError(f"edit: '{self.edit}' needs a source and an alpha")


@dataclass(frozen=True)
class SteeringCondition:
    """One condition of a steering evaluation: `key` is unique within it (headline, random0, random_direction,
    reverse:unembed, zero, all_heads), `group` one of STEERING_GROUPS."""

    key: str
    group: str
    heads: tuple[Head, ...]
    spec: EditSpec

    @property
    def steering(self) -> Steering | None:
        """Return the condition as a `Steering` (source `random` for random directions), None for zero ablation."""
        s = self.spec
        if s.edit == "zero":
            return None
        return Steering(self.heads, s.edit, RANDOM_SOURCE if s.direction_seed is not None else s.source, s.alpha)

    @property
    def name(self) -> str:
        """Return the stage's condition name: role, edit, source, strength and heads, e.g.
        `headline:steer:contrast:a4:L21H3` (`all` for the all-heads condition)."""
        role = "exploratory" if self.group == STEERING_EXPLORATORY else self.key
        heads = ALL if self.group == STEERING_ALL_HEADS else format_heads(self.heads)
        st = self.steering
        label = f"zero:{heads}" if st is None else f"{st.edit}:{st.source}:a{st.alpha:g}:{heads}"
        return f"{role}:{label}"


def _spec(cond: Steering, **extra: Any) -> EditSpec:
    return EditSpec(cond.edit, cond.source, float(cond.alpha), **extra)


def steering_conditions(headline: Steering | None, *, layers: Sequence[int], random_sets: Sequence[Sequence[Head]],
                        direction_seed: int, sources: Sequence[str], edits: Sequence[str],
                        all_heads: Steering | None = None) -> list[SteeringCondition]:
    """Return the conditions evaluating `headline` (headline, one condition per given random head set, random
    directions drawn from `direction_seed`, the exploratory ones), then `all_heads` when given. The headline's
    and the random sets' heads must lie in `layers`."""
    out: list[SteeringCondition] = []
    if headline is not None:
        require_in_layers((*headline.heads, *(h for hs in random_sets for h in hs)), layers)
        spec = _spec(headline)
        out.append(SteeringCondition("headline", STEERING, headline.heads, spec))
        out += [SteeringCondition(f"random{i}", STEERING_RANDOM, tuple(sorted(heads)), spec)
                for i, heads in enumerate(random_sets)]
        out.append(SteeringCondition("random_direction", STEERING_RANDOM_DIRECTION, headline.heads,
                                     _spec(headline, direction_seed=int(direction_seed))))
        out += [SteeringCondition(f"{edit}:{source}", STEERING_EXPLORATORY, headline.heads,
                                  EditSpec(edit, source, float(headline.alpha)))
                for source in sources for edit in edits if (source, edit) != (headline.source, headline.edit)]
        out.append(SteeringCondition("zero", STEERING_EXPLORATORY, headline.heads, EditSpec("zero")))
    if all_heads is not None:
        out.append(SteeringCondition("all_heads", STEERING_ALL_HEADS, all_heads.heads, _spec(all_heads)))
    return out


def preregistered_conditions(select_manifest: Mapping[str, Any], layers: Sequence[int], n_heads: int, *,
                             seed: int) -> list[SteeringCondition]:
    """Return the steering conditions of the select stage's preregistration (its summary's `steering` headline,
    fluency-matched random sets and all-heads records; its config's sources and edits); none when steering was off
    or nothing was preregistered. The random directions are drawn from `hash_seed(seed, size, 0)`."""
    steering = select_manifest["summary"].get("steering")
    if not steering:
        return []
    plan = select_manifest["config"]["select"]["steering"]
    every = [(int(la), h) for la in layers for h in range(n_heads)]
    rec, rec_all = steering.get("headline"), steering.get("all_heads")
    headline = None if rec is None else condition_from_record(rec, every)
    size = 0 if headline is None else len(headline.heads)
    controls = (steering.get("controls") or {}).get("random_sets", [])
    return steering_conditions(headline, layers=layers,
                               random_sets=[tuple(parse_head_list(r["heads"])) for r in controls],
                               direction_seed=hash_seed(seed, size, 0), sources=plan["sources"],
                               edits=plan["edits"],
                               all_heads=None if rec_all is None else condition_from_record(rec_all, every))


def intervention_of(heads: Sequence[Head], spec: EditSpec, d_hat: Directions | None,
                    sigma: Mapping[str, Mapping[int, torch.Tensor]] | None) -> HeadIntervention:
    """Return the head edit of `spec` at `heads` (each head its own direction and sigma of `spec.source`)."""
    heads = tuple(heads)
    if spec.edit == "zero":
        return HeadIntervention("zero", heads)
    if d_hat is None or sigma is None:
        raise ValueError(f"d_hat: '{spec.edit}' needs the select stage's steering directions")
    cond = Steering(heads, spec.edit, spec.source, spec.alpha)
    if spec.direction_seed is None:
        return intervention(cond, d_hat, sigma)
    rand, dirs, sig = random_direction(cond, d_hat, sigma, spec.direction_seed)
    return intervention(rand, {RANDOM_SOURCE: dirs}, {RANDOM_SOURCE: sig})


def load_directions(path: Path) -> tuple[Directions, dict[str, dict[int, torch.Tensor]]]:
    """Return (d_hat `{source: {layer: [H, dh]}}`, sigma `{source: {layer: [H]}}`) of a directions file as tensors."""
    d_hat, sigma = read_directions(path)
    return ({s: {la: torch.from_numpy(a) for la, a in by.items()} for s, by in d_hat.items()},
            {s: {la: torch.from_numpy(a) for la, a in by.items()} for s, by in sigma.items()})


__all__ = ["STEERING", "STEERING_ALL_HEADS", "STEERING_EXPLORATORY", "STEERING_GROUPS", "STEERING_RANDOM",
           "STEERING_RANDOM_DIRECTION", "EditSpec", "SteeringCondition", "intervention_of", "load_directions",
           "preregistered_conditions", "steering_conditions"]
