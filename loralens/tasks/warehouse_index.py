"""The warehouse as a derived index: a complete version's rows and `artifacts` row come from its manifest and files.

The manifest is the one record that a version is complete. Prefect's cache only saves re-running a task; the
DuckDB warehouse can always be put back from the artifacts, one version (`ensure_indexed`, after a Prefect cache
hit) or all of them (`rebuild`, `loralens rebuild`), with each stage's registered `store` (tasks/registry.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loralens.tasks.registry import stage_names
from loralens.tasks.stage_versions import StageVersion, index_version, require_complete
from loralens.warehouse.artifacts import ArtifactDir
from loralens.warehouse.db import is_registered_complete, warehouse_path
from loralens.warehouse.rebuild import rebuild_warehouse


def ensure_indexed(ver: StageVersion) -> bool:
    """Put a complete version's rows back into its home's warehouse unless it registers them already (e.g. after
    a Prefect cache hit on a home whose warehouse was deleted); return True if it indexed them now."""
    manifest = require_complete(ver)
    db = warehouse_path(ver.home)
    if is_registered_complete(db, ver.version):
        return False
    index_version(ver, manifest)
    return True


def rebuild(home: Path) -> list[ArtifactDir]:
    """Recreate `home`'s warehouse from the manifests and files of every complete version, in stage order; return
    the versions indexed. A rebuilt `artifacts` row cannot know when its run started: its `created_at` is when
    the version completed."""

    def index(db: Path, adir: ArtifactDir, manifest: dict[str, Any]) -> None:
        index_version(StageVersion.from_manifest(home, manifest), manifest, db=db, created_at=manifest["completed_at"])

    return rebuild_warehouse(home, stage_names(), index)
