"""The chain of stage versions of a config: cache -> train -> decode -> attribute -> select, each from its input's
version.

The one place that knows which stage's version is built from which (the flows, the CLI and the tests use it). The
intervene version is not part of it: it resolves its head sets from complete attribute and select versions and a
complete cache (`intervene_version(cfg, chain["select"], chain["attribute"], chain["cache"])`).
"""

from __future__ import annotations

from loralens.config import PipelineConfig
from loralens.tasks.stage_versions import StageVersion
from loralens.tasks.stages.attribute import attribute_version
from loralens.tasks.stages.cache import cache_version
from loralens.tasks.stages.decode import decode_version
from loralens.tasks.stages.select import select_version
from loralens.tasks.stages.train import train_version

CHAIN = ("cache", "train", "decode", "attribute", "select")


def stage_chain(cfg: PipelineConfig, through: str = "attribute",
                cache_ver: StageVersion | None = None) -> dict[str, StageVersion]:
    """Return `{stage: StageVersion}` for the stages from cache up to `through` (inclusive), in order.

    `cache_ver` reuses a cache version already computed (it reads the corpus and fingerprints the model).
    """
    if through not in CHAIN:
        raise ValueError(f"through: expected one of {', '.join(CHAIN)}, got {through!r}")
    wanted = CHAIN[:CHAIN.index(through) + 1]
    chain = {"cache": cache_ver or cache_version(cfg)}
    if "train" in wanted:
        chain["train"] = train_version(cfg, chain["cache"])
    if "decode" in wanted:
        chain["decode"] = decode_version(cfg, chain["train"])
    if "attribute" in wanted:
        chain["attribute"] = attribute_version(cfg, chain["decode"])
    if "select" in wanted:
        chain["select"] = select_version(cfg, chain["attribute"])
    return chain
