"""What a stage will produce: its version, hashed config and input versions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralens.warehouse.artifacts import ArtifactDir, ArtifactError


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
