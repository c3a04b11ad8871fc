"""Garbage collection of artifact versions that nothing kept depends on.

Roots are the newest `keep_latest` complete versions of each stage and every incomplete version that is
kept (it may be a resumable run). Everything a root descends from (its parents, as recorded in the
manifest's `inputs` and in the warehouse's `artifacts.parents`) is kept too. What is left is garbage:
complete versions outside that set, incomplete ones only when asked and not their stage's newest attempt,
and warehouse rows of versions whose folder is gone.

Removal deletes the warehouse rows first (one transaction), then each folder by renaming it to a
`.trash-` name before deleting it, so a killed collection never leaves a half-deleted folder that still
looks like a version; the next collection finishes the leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb

from loralens.warehouse.artifacts import ArtifactDir, ArtifactError
from loralens.warehouse.constants import ARTIFACTS_DIR, MANIFEST
from loralens.warehouse.db import connect, warehouse_path, write_transaction

TRASH_PREFIX = ".trash-"
DEFAULT_WAIT_S = 30.0

REASON_SUPERSEDED = "superseded (not newest, not a parent of a kept version)"
REASON_INCOMPLETE = "incomplete and not the newest attempt of its stage"
REASON_NO_FOLDER = "registered in the warehouse, folder missing"
REASON_TRASH = "left by an interrupted gc"

# The warehouse's tables that hold per-version rows are found through information_schema, so tables
# added by later stages (generations, interventions, ...) are collected without touching this module.
_VERSION_TABLES_SQL = """
SELECT c.table_name
FROM information_schema.columns c
JOIN information_schema.tables t
  ON t.table_catalog = c.table_catalog AND t.table_schema = c.table_schema AND t.table_name = c.table_name
WHERE c.column_name = 'version' AND t.table_type = 'BASE TABLE' AND c.table_schema = 'main'
ORDER BY c.table_name
"""


class GcError(ArtifactError):
    """A garbage-collection request cannot be carried out (bad option, folder that cannot be removed)."""


@dataclass(frozen=True)
class VersionInfo:
    """One version found on disk or in the warehouse."""

    stage: str
    version: str
    path: Path
    on_disk: bool
    complete: bool
    parents: frozenset[str]
    time: float  # complete: when it completed; incomplete: its folder's last change
    bytes: int


@dataclass(frozen=True)
class Garbage:
    """Something gc would remove: a version folder and/or its warehouse rows, or a trash leftover."""

    stage: str
    version: str
    path: Path
    bytes: int
    reason: str
    on_disk: bool = True


@dataclass(frozen=True)
class GcResult:
    """What a collection removed."""

    removed: list[Garbage]
    bytes: int
    rows: dict[str, int]  # table -> rows deleted


def _last_change(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for p in folder.rglob("*"):
        try:
            times.append(p.stat().st_mtime)
        except FileNotFoundError:
            continue  # a running stage's temp file, already renamed
    return max(times)


def _disk_versions(home: Path) -> dict[str, VersionInfo]:
    out: dict[str, VersionInfo] = {}
    for stage_dir in sorted((home / ARTIFACTS_DIR).glob("*")):
        if not stage_dir.is_dir() or stage_dir.name.startswith("."):
            continue
        for vdir in sorted(stage_dir.iterdir()):
            if not vdir.is_dir() or vdir.name.startswith("."):  # temp files and gc trash are not versions
                continue
            adir = ArtifactDir(home, stage_dir.name, vdir.name)
            manifest = _read_manifest(vdir)
            if manifest is not None:
                parents = frozenset(str(v) for v in manifest.get("inputs", {}).values())
                when = float(manifest.get("completed_at") or (vdir / MANIFEST).stat().st_mtime)
            else:
                parents, when = frozenset(), _last_change(vdir)
            out[vdir.name] = VersionInfo(stage_dir.name, vdir.name, vdir, True, manifest is not None, parents,
                                         when, adir.size_bytes())
    return out


def _read_manifest(vdir: Path) -> dict | None:
    try:
        return json.loads((vdir / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # an unreadable manifest does not make a version complete


def _registered(home: Path, wait_s: float) -> list[tuple[str, str, list[str]]]:
    db = warehouse_path(home)
    if not db.exists():
        return []
    with connect(db, read_only=True, wait_s=wait_s) as con:
        try:
            return [(s, v, list(p or [])) for s, v, p in
                    con.execute("SELECT stage, version, parents FROM artifacts").fetchall()]
        except duckdb.CatalogException:
            return []  # a warehouse created before any artifact was registered


def scan_versions(home: Path, *, wait_s: float = DEFAULT_WAIT_S) -> dict[str, VersionInfo]:
    """Return every version under `home`, on disk or only registered, with its parents from both sources."""
    found = _disk_versions(home)
    for stage, version, parents in _registered(home, wait_s):
        info = found.get(version)
        if info is None:
            found[version] = VersionInfo(stage, version, home / ARTIFACTS_DIR / stage / version, False, False,
                                         frozenset(parents), 0.0, 0)
        else:
            found[version] = VersionInfo(info.stage, version, info.path, True, info.complete,
                                         info.parents | frozenset(parents), info.time, info.bytes)
    return found


def _roots(versions: dict[str, VersionInfo], keep_latest: int, include_incomplete: bool) -> set[str]:
    roots: set[str] = set()
    for stage in {v.stage for v in versions.values()}:
        mine = [v for v in versions.values() if v.stage == stage and v.on_disk]
        complete = sorted((v for v in mine if v.complete), key=lambda v: v.time, reverse=True)
        roots.update(v.version for v in complete[:keep_latest])
        newest = max(mine, key=lambda v: v.time, default=None)
        for v in mine:
            # An incomplete folder may be a killed run that the next `loralens run` resumes.
            if not v.complete and (not include_incomplete or v is newest):
                roots.add(v.version)
    return roots


def _ancestry(versions: dict[str, VersionInfo], roots: set[str]) -> set[str]:
    kept, todo = set(), list(roots)
    while todo:
        version = todo.pop()
        if version in kept:
            continue
        kept.add(version)
        info = versions.get(version)
        if info is not None:
            # Cache inputs are model and corpus fingerprints, not versions: only known versions are followed.
            todo.extend(p for p in info.parents if p in versions)
    return kept


def _trash_leftovers(home: Path) -> list[Garbage]:
    out = []
    for trash in sorted((home / ARTIFACTS_DIR).glob(f"*/{TRASH_PREFIX}*")):
        size = sum(p.stat().st_size for p in trash.rglob("*") if p.is_file()) if trash.is_dir() else 0
        out.append(Garbage(trash.parent.name, trash.name, trash, size, REASON_TRASH))
    return out


def find_garbage(home: Path, *, keep_latest: int = 1, include_incomplete: bool = False,
                 wait_s: float = DEFAULT_WAIT_S) -> list[Garbage]:
    """Return what a collection would remove under `home`, by stage then version; removes nothing."""
    if keep_latest < 1:
        raise GcError(f"gc: --keep-latest must be at least 1 (got {keep_latest})")
    versions = scan_versions(home, wait_s=wait_s)
    kept = _ancestry(versions, _roots(versions, keep_latest, include_incomplete))
    out = []
    for v in sorted(versions.values(), key=lambda v: (v.stage, v.time, v.version)):
        if v.version in kept:
            continue
        reason = REASON_NO_FOLDER if not v.on_disk else REASON_SUPERSEDED if v.complete else REASON_INCOMPLETE
        out.append(Garbage(v.stage, v.version, v.path, v.bytes, reason, v.on_disk))
    return out + _trash_leftovers(home)


def version_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Return the warehouse's base tables that have a `version` column."""
    return [r[0] for r in con.execute(_VERSION_TABLES_SQL).fetchall()]


def delete_version_rows(home: Path, versions: list[str], *, wait_s: float = DEFAULT_WAIT_S) -> dict[str, int]:
    """Delete every row of `versions` from every versioned table in one transaction; return rows per table."""
    db = warehouse_path(home)
    if not versions or not db.exists():
        return {}

    def delete(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
        counts = {}
        for table in version_tables(con):
            counts[table] = con.execute(f'DELETE FROM "{table}" WHERE list_contains(?, version)',
                                        [versions]).fetchone()[0]
        return counts

    return write_transaction(db, delete, wait_s=wait_s)


def remove_folder(path: Path) -> None:
    """Rename `path` to a `.trash-` sibling, then delete it (a kill leaves only trash, never a partial version)."""
    if not path.exists():
        return
    trash = path if path.name.startswith(TRASH_PREFIX) else path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    try:
        if trash != path:
            os.replace(path, trash)
        shutil.rmtree(trash)
    except OSError as err:
        raise GcError(f"gc: cannot remove {path}: {err.strerror or err}") from None


def collect_garbage(home: Path, garbage: list[Garbage], *, wait_s: float = DEFAULT_WAIT_S) -> GcResult:
    """Remove `garbage`: the warehouse rows first (one transaction, nothing removed if it fails), then folders."""
    versions = [g.version for g in garbage if g.reason != REASON_TRASH]
    rows = delete_version_rows(home, versions, wait_s=wait_s)
    for g in garbage:
        if g.on_disk:
            remove_folder(g.path)
    return GcResult(removed=list(garbage), bytes=sum(g.bytes for g in garbage), rows=rows)
