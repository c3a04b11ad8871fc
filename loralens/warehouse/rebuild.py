"""Recreate a home's warehouse from its artifacts: the DuckDB file is an index of the complete versions' files.

A version is complete when its manifest exists (written last); the warehouse holds rows copied from its Parquet
and JSON files, which every stage can load again (`tasks/warehouse_index.py`). The new file is built beside the old
one (`<home>/.tmp-warehouse.duckdb`) while the old one is held open for writing, so no pipeline writes meanwhile,
then renamed over it: a rebuild killed midway leaves the old warehouse as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import duckdb

from loralens.warehouse.artifacts import ArtifactDir, ArtifactError
from loralens.warehouse.constants import ARTIFACTS_DIR, TMP_PREFIX, WAREHOUSE_FILE
from loralens.warehouse.db import WarehouseLockedError, connect, warehouse_path

# index(db, adir, manifest): load one complete version's rows into the warehouse file `db` and register it.
IndexFn = Callable[[Path, ArtifactDir, dict[str, Any]], None]


def complete_versions(home: Path, stages: Sequence[str]) -> list[tuple[ArtifactDir, dict[str, Any]]]:
    """Return every complete version under `home` with its manifest, in `stages` order, then by version name.

    Dot-folders (temp files, gc trash, a forced rebuild's backup) are not versions; a stage folder not named in
    `stages` is left out.
    """
    out = []
    for stage in stages:
        stage_dir = home / ARTIFACTS_DIR / stage
        folders = sorted(stage_dir.iterdir()) if stage_dir.is_dir() else []
        for folder in folders:
            if folder.is_dir() and not folder.name.startswith("."):
                adir = ArtifactDir(home, stage, folder.name)
                manifest = _manifest(adir)
                if manifest is not None:
                    out.append((adir, manifest))
    return out


def _manifest(adir: ArtifactDir) -> dict[str, Any] | None:
    try:
        return adir.manifest()
    except ValueError:
        return None  # an unreadable manifest does not make a version complete


@contextmanager
def _kept_from_writers(db: Path) -> Iterator[None]:
    """Hold the existing warehouse open for writing while the block runs (another writer waits, then fails).

    A file DuckDB cannot open for another reason than a lock (the damage a rebuild repairs) is not held.
    """
    with ExitStack() as stack:
        if db.exists():
            try:
                stack.enter_context(connect(db))
            except WarehouseLockedError:
                raise
            except duckdb.Error:
                pass
        yield


def rebuild_warehouse(home: Path, stages: Sequence[str], index: IndexFn) -> list[ArtifactDir]:
    """Replace `home`'s warehouse with one indexing every complete version (`index` per version, in `stages`
    order); return the versions indexed. Rows of incomplete versions (running, failed, killed) are not kept."""
    if not (home / ARTIFACTS_DIR).is_dir():
        raise ArtifactError(f"no artifacts under {home}: nothing to rebuild the warehouse from")
    db = warehouse_path(home)
    tmp = home / f"{TMP_PREFIX}{WAREHOUSE_FILE}"
    versions = complete_versions(home, stages)
    with _kept_from_writers(db):
        for leftover in (tmp, _wal(tmp)):  # a killed rebuild's
            leftover.unlink(missing_ok=True)
        with connect(tmp) as con:  # the schema, even for a home without complete versions
            con.execute("CHECKPOINT")
        for adir, manifest in versions:
            index(tmp, adir, manifest)
        with connect(tmp) as con:
            con.execute("CHECKPOINT")  # every row in the file itself: no write-ahead log travels with it
    _wal(db).unlink(missing_ok=True)  # the old file's log must never be replayed onto the new one
    os.replace(tmp, db)
    return [adir for adir, _ in versions]


def _wal(db: Path) -> Path:
    return db.with_name(db.name + ".wal")

