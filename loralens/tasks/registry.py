"""The pipeline's stages, declared once each, in run order: cache -> train -> decode -> attribute -> select ->
intervene.

Everything that lists stages derives from `REGISTRY`: the chain of versions (`tasks/chain.py`), the pipeline's loop
(`flows/pipeline.py`), the warehouse rebuild (`tasks/warehouse_index.py`), and, checked by tests/test_registry.py,
`prefect.yaml`'s deployments, the CLI's stage names (`warehouse.constants.STAGES`, a plain tuple the light CLI can
import) and the split stages of the memory check (`tasks.memory.SPLIT_STAGES`).

Adding a stage: a module `tasks/stages/<name>.py` (its version function, Prefect task and `store_rows`), a module
`flows/<name>.py` (its stage run and Prefect flow), and one `Stage(...)` line below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralens.config import PipelineConfig
from loralens.tasks.stage_versions import StageVersion
from loralens.tasks.stages import attribute, cache, decode, intervene, select, train

VersionFn = Callable[[PipelineConfig, Mapping[str, StageVersion]], StageVersion]


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return the summary a complete version registers: its manifest's."""
    return manifest["summary"]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: what it is computed from, how its version is named, how its warehouse rows come back.

    `version(cfg, upstream)` gets the versions of the stages before it (by name). `store(db, ver)` loads a
    complete version's warehouse rows from its artifact folder (idempotent); `rows_key` names the manifest summary's
    count that the `artifacts` row records. `run` and `flow` are `module:function` names in the flows layer (tasks
    never import flows): the stage run the pipeline calls as `run(cfg, cache_ver, force=, verify=[, workers=])`,
    and the Prefect flow of its own deployment. `splits`: its work units map over Dask worker processes (`run`
    then takes `workers`).
    """

    name: str
    parents: tuple[str, ...]
    version: VersionFn
    store: Callable[[Path, StageVersion], Any]
    rows_key: str
    run: str
    flow: str
    splits: bool = False
    summary: Callable[[dict[str, Any]], dict[str, Any]] = manifest_summary

    def lineage(self, ver: StageVersion) -> list[str]:
        """Return the versions its `artifacts` row names as parents: its parent stages' (a stage without parent
        stages: the fingerprints of its raw inputs, e.g. the model and the corpus)."""
        return [ver.inputs[p] for p in self.parents] if self.parents else list(ver.inputs.values())

    @property
    def entrypoint(self) -> str:
        """Return its flow as a Prefect deployment entrypoint (`loralens/flows/<module>.py:<flow>`)."""
        module, _, function = self.flow.partition(":")
        return f"{module.replace('.', '/')}.py:{function}"


REGISTRY: tuple[Stage, ...] = (
    Stage("cache", (), lambda cfg, up: cache.cache_version(cfg), cache.store_rows, "n_tokens",
          "loralens.flows.cache:cache_stage", "loralens.flows.cache:cache_activations", splits=True,
          summary=cache.registered_summary),
    Stage("train", ("cache",), lambda cfg, up: train.train_version(cfg, up["cache"]), train.store_rows, "heads",
          "loralens.flows.train:train_stage", "loralens.flows.train:train_lenses"),
    Stage("decode", ("train",), lambda cfg, up: decode.decode_version(cfg, up["train"]), decode.store_rows, "rows",
          "loralens.flows.decode:decode_stage", "loralens.flows.decode:decode_heads", splits=True),
    Stage("attribute", ("decode",), lambda cfg, up: attribute.attribute_version(cfg, up["decode"]),
          attribute.store_rows, "rows",
          "loralens.flows.attribute:attribute_stage", "loralens.flows.attribute:attribute_heads"),
    Stage("select", ("attribute",), lambda cfg, up: select.select_version(cfg, up["attribute"]), select.store_rows,
          "rows", "loralens.flows.select:select_stage", "loralens.flows.select:select_heads"),
    # Its version names its head sets, resolved from complete attribute and select versions and a complete cache.
    Stage("intervene", ("select",),
          lambda cfg, up: intervene.intervene_version(cfg, up["select"], up["attribute"], up["cache"])[0],
          intervene.store_rows, "generations",
          "loralens.flows.intervene:intervene_stage", "loralens.flows.intervene:intervene_heads", splits=True),
)


def stage_names() -> tuple[str, ...]:
    """Return every stage's name, in run order."""
    return tuple(s.name for s in REGISTRY)


def get_stage(name: str) -> Stage:
    """Return the stage called `name`, or raise a one-line ValueError listing the stages."""
    for s in REGISTRY:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage '{name}'; stages: {', '.join(stage_names())}")
