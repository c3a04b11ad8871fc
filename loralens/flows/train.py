"""Flow `train_lenses`: the train stage (needs a complete cache version)."""

from __future__ import annotations

import json
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loralens.config import PipelineConfig
from loralens.flows.common import pinned_config, resolve_config, run_stage_task
from loralens.tasks.chain import stage_chain
from loralens.tasks.report import fidelity_markdown
from loralens.tasks.stage_versions import StageVersion
from loralens.tasks.stages.train import train_task
from loralens.warehouse.constants import FIDELITY_HEATMAP, TRAIN_FIDELITY


def train_stage(cfg: PipelineConfig, cache_ver: StageVersion | None = None, force: bool = False,
                verify: bool = False) -> dict[str, Any]:
    """Run the train task keyed by its version (the cache version is one of its inputs)."""
    chain = stage_chain(cfg, "train", cache_ver)
    ver = chain["train"]
    summary = run_stage_task(train_task, cfg, ver, chain["cache"], force=force, verify=verify)
    fid = json.loads((ver.artifact.path / TRAIN_FIDELITY).read_text())
    report = fidelity_markdown(fid, ver.artifact.path / FIDELITY_HEATMAP)
    create_markdown_artifact(key="lens-fidelity", markdown=report, description=f"train stage, version {ver.version}")
    return summary


@flow(name="train-lenses")
def train_lenses(
    config_path: str | None = None, config: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Train a Lora Lens for every head of every cached layer under DeepSpeed."""
    return train_stage(pinned_config(resolve_config(config_path, config)), force=force)
