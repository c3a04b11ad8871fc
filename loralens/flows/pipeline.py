"""The Lora Lens pipeline flow: cache -> train -> decode -> attribute -> intervene."""

from __future__ import annotations

from typing import Any

from prefect import flow

from loralens.flows.attribute import attribute_stage
from loralens.flows.cache import cache_stage
from loralens.flows.common import resolve_config
from loralens.flows.decode import decode_stage
from loralens.flows.intervene import intervene_stage
from loralens.flows.train import train_stage
from loralens.tasks.cache import plan_cache

STAGES = ("cache", "train", "decode", "attribute", "intervene")


@flow(name="loralens-pipeline")
def pipeline(
    config_path: str | None = None,
    config: dict[str, Any] | None = None,
    only: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run every stage (or `only` one), each skipped when its artifact version is already complete."""
    if only is not None and only not in STAGES:
        raise ValueError(f"unknown stage '{only}'; stages: {', '.join(STAGES)}")
    cfg = resolve_config(config_path, config)
    cache_plan = plan_cache(cfg)  # one read of the corpus and model fingerprint serves every stage
    results: dict[str, Any] = {}
    if only in (None, "cache"):
        results["cache"] = cache_stage(cfg, cache_plan, force=force)
    if only in (None, "train"):
        results["train"] = train_stage(cfg, cache_plan, force=force)
    if only in (None, "decode"):
        results["decode"] = decode_stage(cfg, cache_plan, force=force)
    if only in (None, "attribute"):
        results["attribute"] = attribute_stage(cfg, cache_plan, force=force)
    if only in (None, "intervene"):
        results["intervene"] = intervene_stage(cfg, cache_plan, force=force)
    return results
