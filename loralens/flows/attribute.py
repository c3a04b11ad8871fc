"""Flow `attribute_heads`: the attribute stage (needs a complete decode version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loralens.config import PipelineConfig
from loralens.flows.common import pinned_config, resolve_config, run_stage_task
from loralens.tasks.chain import stage_chain
from loralens.tasks.stage_versions import StageVersion
from loralens.tasks.stages.attribute import attribute_task


def attribute_stage(cfg: PipelineConfig, cache_ver: StageVersion | None = None, force: bool = False,
                    verify: bool = False) -> dict[str, Any]:
    """Run the attribute task keyed by its version; attach the top-heads table and heatmaps to the flow run.

    Always in this process, never split over Dask workers (no `workers`): it loads no language model, and its
    scores are DuckDB SQL aggregations over decode's Parquet (readouts and decodings), fast next to the stages that
    split (cache, decode, intervene).
    """
    chain = stage_chain(cfg, "attribute", cache_ver)
    ver = chain["attribute"]
    summary = run_stage_task(attribute_task, cfg, ver, chain["decode"], chain["train"], chain["cache"], force=force,
                             verify=verify)
    report = Path(summary["report"]).read_text(encoding="utf-8")
    heatmaps = "\n".join(f"- {m}: `{p}`" for m, p in summary["heatmaps"].items())
    create_markdown_artifact(key="top-toxic-heads", markdown=f"{report}\nHeatmaps (layers x heads):\n{heatmaps}\n",
                             description=f"attribute stage, version {ver.version}")
    return summary


@flow(name="attribute-heads")
def attribute_heads(
    config_path: str | None = None, config: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Score every head's contribution to toxicity by several methods and store the scores in DuckDB."""
    return attribute_stage(pinned_config(resolve_config(config_path, config)), force=force)
