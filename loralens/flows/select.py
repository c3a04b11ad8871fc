"""Flow `select_heads`: the select stage (needs a complete attribute version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loralens.config import PipelineConfig
from loralens.flows.common import pinned_config, resolve_config, run_stage_task
from loralens.tasks.chain import stage_chain
from loralens.tasks.stage_versions import StageVersion
from loralens.tasks.stages.select import select_task


def select_stage(cfg: PipelineConfig, cache_ver: StageVersion | None = None, force: bool = False,
                 verify: bool = False) -> dict[str, Any]:
    """Run the select task keyed by its version; attach its selection report to the flow run."""
    chain = stage_chain(cfg, "select", cache_ver)
    ver = chain["select"]
    summary = run_stage_task(select_task, cfg, ver, chain["attribute"], chain["decode"], chain["cache"], force=force,
                             verify=verify)
    create_markdown_artifact(key="head-selection", markdown=Path(summary["report"]).read_text(encoding="utf-8"),
                             description=f"select stage, version {ver.version}")
    return summary


@flow(name="select-heads")
def select_heads(
    config_path: str | None = None, config: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Score every head causally (ablation_tox_drop, attribution_patching), choose a head set on the selection
    split."""
    return select_stage(pinned_config(resolve_config(config_path, config)), force=force)
