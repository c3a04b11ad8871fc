"""What a stage will produce: its version, hashed config and input versions."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralens.warehouse.artifacts import ArtifactDir, ArtifactError
from loralens.warehouse.db import ensure_writable, mark_failed, upsert_artifact, warehouse_path

log = logging.getLogger("loralens.plans")
# Stages whose resume path would re-record the files already in the folder (train keeps its finished result,
# attribute records all its files as one shard): a corrupted file there means redoing the whole version.
WHOLE_VERSION_STAGES = ("train", "attribute")


@dataclass(frozen=True)
class StagePlan:
    """A stage output to be: its version, the config it hashed and its inputs' versions."""

    stage: str
    version: str
    config: dict[str, Any]
    inputs: dict[str, str]
    home: Path

    @property
    def artifact(self) -> ArtifactDir:
        """Return the folder of this version."""
        return ArtifactDir(self.home, self.stage, self.version)


def require_complete(plan: StagePlan) -> dict[str, Any]:
    """Return an upstream artifact's manifest, or raise naming the stage to run first."""
    manifest = plan.artifact.manifest()
    if manifest is None:
        raise ArtifactError(f"missing upstream artifact: {plan.stage} version {plan.version} is not complete; "
                            f"run `loralens run --only {plan.stage}` first")
    return manifest


@contextmanager
def failures_recorded(plan: StagePlan) -> Iterator[None]:
    """Mark the plan's version failed in the warehouse when the stage raises (the error still propagates)."""
    try:
        yield
    except Exception:
        try:
            mark_failed(warehouse_path(plan.home), plan.version)
        except Exception:  # noqa: BLE001 - e.g. the warehouse is the thing that failed; keep the first error
            pass
        raise


def reverify_on_reuse(plan: StagePlan) -> bool:
    """Re-check a complete version's files against its manifest checksums; return True if it was reopened.

    A file changed after completion never counts as done: cache, decode and intervene reopen just the bad
    shards (the stage redoes them); train and attribute start the version over.
    """
    bad = plan.artifact.reopen_corrupt_shards()
    if not bad:
        return False
    if plan.stage in WHOLE_VERSION_STAGES:
        log.warning("%s %s: a file failed its checksum; redoing the version", plan.stage, plan.version)
        plan.artifact.reset()
    else:
        log.warning("%s %s: shard(s) %s failed their checksums; redoing them", plan.stage, plan.version, bad)
    return True


def register(plan: StagePlan, parents: list[str], status: str, *, rows: int | None = None,
             bytes_: int | None = None, summary: dict[str, Any] | None = None) -> None:
    """Insert or update the plan's row in the warehouse `artifacts` table (one transaction)."""
    upsert_artifact(warehouse_path(plan.home), stage=plan.stage, version=plan.version, parents=parents,
                    config=plan.config, status=status, rows=rows, bytes_=bytes_, artifact_dir=str(plan.artifact.path),
                    summary=summary)


def reset_for_force(plan: StagePlan) -> None:
    """Delete the plan's artifact for --force, after checking the warehouse is writable: a locked warehouse must
    not cost the old artifact."""
    ensure_writable(warehouse_path(plan.home))
    plan.artifact.reset()
