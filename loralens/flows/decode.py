"""Flow `decode_heads`: the decode stage (needs a complete train version)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from loralens.config import PipelineConfig
from loralens.flows.common import resolve_config, run_stage_task
from loralens.tasks.chain import stage_chain
from loralens.tasks.decode import decode_task
from loralens.tasks.stage_versions import StageVersion


def decode_stage(cfg: PipelineConfig, cache_ver: StageVersion | None = None, force: bool = False,
                 verify: bool = False) -> dict[str, Any]:
    """Run the decode task keyed by its version (the train version is its input)."""
    chain = stage_chain(cfg, "decode", cache_ver)
    return run_stage_task(decode_task, cfg, chain["decode"], chain["train"], chain["cache"], force=force,
                          verify=verify)


@flow(name="decode-heads")
def decode_heads(
    config_path: str | None = None, config: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Decode every head's output through its trained lens and the logit lens into top-k tokens."""
    return decode_stage(resolve_config(config_path, config), force=force)
