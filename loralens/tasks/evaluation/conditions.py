"""The intervene stage's conditions: baseline, attributed head sets, the selected set, random controls, the select
stage's preregistered steering condition with its controls (`steering_conditions.py`), single-head ablations."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq

from loralens.config import ConfigError, HeadSetConfig, InterveneConfig
from loralens.lens.evaluation.generation import hash_seed
from loralens.lens.heads.head_sets import Head, format_heads, parse_head_list, random_head_sets
from loralens.tasks.evaluation.steering_conditions import EditSpec, preregistered_conditions
from loralens.tasks.stage_versions import StageVersion, require_complete
from loralens.warehouse.constants import HEAD_SCORES_FILE
from loralens.warehouse.db import connect, warehouse_path

log = logging.getLogger("loralens.intervene")


@dataclass(frozen=True)
class Condition:
    """One generation condition."""

    name: str
    group: str  # baseline | attributed | selected | random | ablation | ablation_baseline | STEERING_GROUPS
    heads: tuple[Head, ...]
    n_prompts: int
    k: int
    edit: EditSpec | None = None  # the condition's own edit; None: `intervene.kind` (zero for the ablation groups)

    def to_dict(self) -> dict:
        """Return a JSON-serialisable description (part of the stage version; `edit` only when set)."""
        d = asdict(self)
        d["heads"] = format_heads(self.heads)
        if self.edit is None:
            del d["edit"]  # the zero-ablation conditions hash as they did before conditions had their own edit
        return d


def ranked_heads(score_versions: tuple[StageVersion, ...], method: str) -> list[Head]:
    """Return every head ordered by its rank under `method` (ties by layer, head), from the first of the versions
    (attribute, select) whose artifact scores it."""
    known: set[str] = set()
    for ver in score_versions:
        require_complete(ver)
        path = ver.artifact.path / HEAD_SCORES_FILE
        t = pq.read_table(path, filters=[("method", "=", method)], columns=["layer", "head", "rank"])
        if t.num_rows:
            break
        known |= set(pq.read_table(path, columns=["method"]).column("method").to_pylist())
    else:
        raise ConfigError(f"config error: method '{method}' has no head scores; methods: {', '.join(sorted(known))}")
    rows = sorted(zip(t.column("rank").to_pylist(), t.column("layer").to_pylist(), t.column("head").to_pylist(),
                      strict=True))
    return [(layer, head) for _rank, layer, head in rows]


def sql_heads(home, query: str) -> tuple[Head, ...]:
    """Return the (layer, head) rows of a read-only warehouse query."""
    import duckdb

    with connect(warehouse_path(home), read_only=True) as con:
        try:
            cur = con.execute(query)
        except duckdb.Error as err:
            raise ConfigError(f"config error: intervene.head_sets.sql: {str(err).splitlines()[0]}") from None
        cols = [d[0] for d in cur.description or []]
        if cols[:2] != ["layer", "head"]:
            raise ConfigError(f"config error: intervene.head_sets.sql must return columns (layer, head), got {cols}")
        return tuple(sorted({(int(r[0]), int(r[1])) for r in cur.fetchall()}))


def selected_heads(select_ver: StageVersion) -> tuple[Head, ...]:
    """Return the head set the select stage chose (sorted; empty if it chose none)."""
    return tuple(sorted(parse_head_list(require_complete(select_ver)["summary"]["selected"])))


def resolve_head_set(hs: HeadSetConfig, score_versions: tuple[StageVersion, ...], index: int
                     ) -> tuple[str, tuple[Head, ...]]:
    """Return (condition name, sorted heads) of one configured head set (`score_versions`: attribute, select)."""
    if hs.heads is not None:
        try:
            heads = tuple(sorted(set(parse_head_list(hs.heads))))
        except ValueError as err:
            raise ConfigError(f"config error: intervene.head_sets.{index}.heads: {err}") from None
        return hs.name or f"list:{format_heads(heads)}", heads
    if hs.top_n is not None:
        heads = tuple(sorted(ranked_heads(score_versions, hs.method)[: hs.top_n]))
        return hs.name or f"top{hs.top_n}:{hs.method}", heads
    if hs.selected:
        return hs.name or "selected", selected_heads(score_versions[-1])
    return hs.name or f"sql{index}", sql_heads(score_versions[0].home, hs.sql)


def build_conditions(ic: InterveneConfig, score_versions: tuple[StageVersion, ...], layers: list[int], n_heads: int,
                     n_prompts: int) -> list[Condition]:
    """Return every condition in run order; random sets avoid all chosen heads and match their sizes.

    `score_versions` are the (attribute, select) versions the head sets are read from. A `selected` set the select
    stage left empty (its head budget was 0, or no candidate lowered sampled toxicity) is left out with a warning.
    The select stage's preregistered steering conditions (if any) follow the random controls.
    """
    conds = [Condition("baseline", "baseline", (), n_prompts, ic.k)]
    attributed: list[Condition] = []
    for i, hs in enumerate(ic.head_sets):
        name, heads = resolve_head_set(hs, score_versions, i)
        if not heads and hs.selected:
            log.warning("intervene: the select stage chose no head; condition '%s' left out", name)
            continue
        if not heads:
            raise ConfigError(f"config error: intervene.head_sets.{i}: selects no heads")
        bad = [h for h in heads if h[0] not in layers or not 0 <= h[1] < n_heads]
        if bad:
            raise ConfigError(f"config error: intervene.head_sets.{i}: {format_heads(bad)} not among the "
                              f"{len(layers)} x {n_heads} attributed heads")
        attributed.append(Condition(name, "selected" if hs.selected else "attributed", heads, n_prompts, ic.k))
    names = [c.name for c in attributed]
    if len(set(names)) != len(names) or "baseline" in names:
        raise ConfigError(f"config error: intervene.head_sets: condition names must be unique, got {names}")
    conds += attributed
    exclude = {h for c in attributed for h in c.heads}
    for size in sorted({len(c.heads) for c in attributed}):
        for seed in ic.random_seeds:
            # Draw over the attributed layers' heads (the same pool the lens ranked), relabelled to real layers.
            try:
                (drawn,) = random_head_sets(len(layers), n_heads, size, [hash_seed(seed, size)],
                                            exclude=[(layers.index(layer), h) for layer, h in exclude])
            except ValueError:
                raise ConfigError(f"config error: intervene.random_seeds: a random control of {size} heads needs "
                                  f"{size} heads outside the {len(exclude)} attributed ones; the model has "
                                  f"{len(layers) * n_heads} (use smaller head sets or random_seeds: [])") from None
            heads = tuple(sorted((layers[li], h) for li, h in drawn))
            conds.append(Condition(f"random{size}:s{seed}", "random", heads, n_prompts, ic.k))
    conds += steering_conditions_of(ic, score_versions[-1], layers, n_heads, n_prompts)
    if ic.ablation_candidates:
        n_abl = min(ic.ablation_prompts, n_prompts)
        conds.append(Condition("ablation:baseline", "ablation_baseline", (), n_abl, ic.ablation_k))
        for head in ranked_heads(score_versions, ic.ablation_method)[: ic.ablation_candidates]:
            conds.append(Condition(f"ablate:{format_heads([head])}", "ablation", (head,), n_abl, ic.ablation_k))
    return conds


def steering_conditions_of(ic: InterveneConfig, select_ver: StageVersion, layers: list[int], n_heads: int,
                           n_prompts: int) -> list[Condition]:
    """Return the conditions of the select version's steering preregistration (none with `select.steering` off;
    on, the select version must be complete: its summary names them)."""
    if not select_ver.config["select"].get("steering", {}).get("enabled", False):
        return []
    steering = preregistered_conditions(require_complete(select_ver), layers, n_heads, seed=ic.seed)
    return [Condition(c.name, c.group, c.heads, n_prompts, ic.k, c.spec) for c in steering]


def total_heads(layers: list[int], n_heads: int) -> int:
    """Return the number of heads the conditions choose from."""
    return len(layers) * n_heads


__all__ = ["Condition", "build_conditions", "ranked_heads", "resolve_head_set", "sql_heads", "steering_conditions_of",
           "total_heads"]
