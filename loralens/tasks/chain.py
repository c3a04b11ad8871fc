"""The chain of stage versions of a config: each stage's version from the versions before it, in registry order.

The one place that computes a config's versions (the flows, the CLI and the tests use it). The intervene version
resolves its head sets from complete attribute and select versions and a complete cache, so a chain through
`intervene` needs those complete (its conditions come from `intervene_version` itself).
"""

from __future__ import annotations

from loralens.config import PipelineConfig
from loralens.tasks.registry import REGISTRY, stage_names
from loralens.tasks.stage_versions import StageVersion


def stage_chain(cfg: PipelineConfig, through: str = "attribute",
                cache_ver: StageVersion | None = None) -> dict[str, StageVersion]:
    """Return `{stage: StageVersion}` for the stages from cache up to `through` (inclusive), in order.

    `cache_ver` reuses a cache version already computed (it reads the corpus and fingerprints the model).
    """
    names = stage_names()
    if through not in names:
        raise ValueError(f"through: expected one of {', '.join(names)}, got {through!r}")
    chain: dict[str, StageVersion] = {}
    for stage in REGISTRY[: names.index(through) + 1]:
        known = cache_ver if stage.name == "cache" else None
        chain[stage.name] = known or stage.version(cfg, chain)
    return chain
