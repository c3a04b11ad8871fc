"""A project home, read-only: its artifact versions and its DuckDB warehouse as pyarrow Tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from loralens.api.errors import ApiError
from loralens.defaults import default_home
from loralens.warehouse.artifacts import ArtifactDir
from loralens.warehouse.constants import STAGES
from loralens.warehouse.db import connect, warehouse_path

if TYPE_CHECKING:
    from loralens.api.lenses import Lenses


def open_home(path: str | Path | None = None) -> Home:
    """Return the project home at `path` (default $LORALENS_HOME or ./.loralens); raise ApiError if it has no
    warehouse (run the pipeline first)."""
    home = Path(path).expanduser().resolve() if path is not None else default_home()
    if not warehouse_path(home).exists():
        raise ApiError(f"no warehouse at {warehouse_path(home)}; run the pipeline first (`loralens run`)")
    return Home(home)


@dataclass(frozen=True)
class Home:
    """A project home: its artifact versions and its DuckDB warehouse, read-only.

    Every query opens the warehouse read-only for its own duration only, so a running pipeline (its writer) is
    never blocked for long by a notebook.
    """

    path: Path

    @property
    def warehouse(self) -> Path:
        """Return the warehouse file."""
        return warehouse_path(self.path)

    def sql(self, query: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Return the result of a read-only SQL query on the warehouse as a pyarrow Table."""
        with connect(self.warehouse, read_only=True) as con:
            return con.sql(query, params=list(params or [])).to_arrow_table()

    def versions(self, stage: str | None = None) -> pa.Table:
        """Return the registered versions (newest first): stage, version, status, rows, bytes, parents, created_at,
        completed_at, path; only `stage`'s if given."""
        if stage is not None and stage not in STAGES:
            raise ApiError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
        where = "WHERE stage = ?" if stage else ""
        return self.sql("SELECT stage, version, status, rows, bytes, parents, created_at, completed_at, path "
                        f"FROM artifacts {where} ORDER BY created_at DESC", [stage] if stage else None)

    def latest(self, stage: str, parent: str | None = None) -> str | None:
        """Return the newest complete version of `stage` (computed from `parent`, if given), or None."""
        for row in self.versions(stage).to_pylist():
            if row["status"] != "complete" or not ArtifactDir(self.path, stage, row["version"]).is_complete():
                continue
            if parent is None or parent in (row["parents"] or []):
                return row["version"]
        return None

    def manifest(self, stage: str, version: str) -> dict[str, Any]:
        """Return the manifest of a complete version; ApiError if it is not complete (or does not exist)."""
        manifest = ArtifactDir(self.path, stage, version).manifest()
        if manifest is None:
            raise ApiError(f"{stage} version {version} is not complete in {self.path}")
        return manifest

    def head_scores(self, method: str | None = None, version: str | None = None) -> pa.Table:
        """Return head scores (layer, head, method, score, rank, version) by method then rank, from the newest
        complete attribute version, its newest select version (methods ablation_tox_drop, attribution_patching,
        probe_auroc) and that one's newest intervene version (method 'ablation'), unless `version` is given."""
        versions = [version] if version else [v for v in (self.latest("attribute"),) if v]
        for stage in ("select", "intervene") if not version else ():
            child = self.latest(stage, parent=versions[-1]) if versions else None
            if child is None:
                break
            versions.append(child)
        if not versions:
            raise ApiError(f"no complete attribute version in {self.path}; run `loralens run` first")
        marks = ", ".join("?" * len(versions))
        where = f"version IN ({marks})" + (" AND method = ?" if method else "")
        return self.sql(f"SELECT layer, head, method, score, rank, version FROM head_scores WHERE {where} "
                        "ORDER BY method, rank, layer, head", [*versions, *([method] if method else [])])

    def interventions(self, version: str | None = None) -> pa.Table:
        """Return the intervene stage's metrics, one row per condition, of the newest complete version (or
        `version`)."""
        version = version or self.latest("intervene")
        if version is None:
            raise ApiError(f"no complete intervene version in {self.path}; run `loralens run` first")
        return self.sql("SELECT * EXCLUDE (version) FROM interventions WHERE version = ? ORDER BY condition",
                        [version])

    def lenses(self, version: str | None = None) -> Lenses:
        """Return the trained lenses of train version `version` (default: the newest complete one), read lean."""
        from loralens.api.lenses import Lenses

        version = version or self.latest("train")
        if version is None:
            raise ApiError(f"no complete train version in {self.path}; run `loralens run` (at least "
                           "`--only cache` and `--only train`) first")
        return Lenses.load(self, version)
