"""Connections to the DuckDB warehouse: short write transactions with retry on another writer's lock."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from loralens.killpoints import maybe_kill
from loralens.warehouse.constants import WAREHOUSE_FILE
from loralens.warehouse.json_values import json_safe
from loralens.warehouse.schema import ensure_schema

T = TypeVar("T")
_WRITERS = threading.RLock()
# New warehouse files are written in the storage format of DuckDB 1.4 (LTS), so the file also opens in the plain
# `duckdb` command-line client, whose releases lag the Python package (duckdb-cli 1.5 cannot read 2.0's format).
# The format is fixed in the file when it is created; later connections need no setting (and a setting that
# differs between connections of one process is an error in DuckDB).
STORAGE_COMPATIBILITY = "v1.4.0"


class WarehouseLockedError(RuntimeError):
    """Another process holds the warehouse file open for writing."""


class WarehouseWriteForbidden(RuntimeError):
    """This process must not write the warehouse (a Dask worker: only the flow process writes DuckDB)."""


# Why this process may not write the warehouse; None: it may. Set once in Dask worker processes, which write only
# Parquet into the artifact folder, so no two processes ever contend for the warehouse's file lock.
_WRITES_FORBIDDEN: str | None = None


def forbid_writes(reason: str) -> None:
    """Make every later write connection of this process raise WarehouseWriteForbidden naming `reason`."""
    global _WRITES_FORBIDDEN
    _WRITES_FORBIDDEN = reason


def writes_forbidden() -> str | None:
    """Return why this process may not write the warehouse, or None if it may."""
    return _WRITES_FORBIDDEN


def warehouse_path(home: Path) -> Path:
    """Return the DuckDB file of a project home."""
    return home / WAREHOUSE_FILE


def _is_lock_error(err: Exception) -> bool:
    return "lock" in str(err).lower()


def lock_wait_s() -> float:
    """Return how long a writer waits for another process's lock: $LORALENS_LOCK_WAIT_S or 30 s."""
    return float(os.environ.get("LORALENS_LOCK_WAIT_S", "30"))


def _open(path: Path, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    """Open the file, creating it in the compatible storage format; retry while another process holds it."""
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            if not read_only and not path.exists():
                duckdb.connect(str(path), config={"storage_compatibility_version": STORAGE_COMPATIBILITY}).close()
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as err:
            if not _is_lock_error(err) or time.monotonic() >= deadline:
                if _is_lock_error(err):
                    raise WarehouseLockedError(
                        f"warehouse {path} is locked by another writer (waited {wait_s:.0f} s); "
                        "stop the other process or retry later"
                    ) from None
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


@contextmanager
def connect(path: Path, *, read_only: bool = False, wait_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """Yield a connection, retrying while another process holds the file; read-only never writes."""
    wait_s = lock_wait_s() if wait_s is None else wait_s
    if not read_only and _WRITES_FORBIDDEN is not None:
        raise WarehouseWriteForbidden(f"warehouse {path}: no writes from this process ({_WRITES_FORBIDDEN})")
    path.parent.mkdir(parents=True, exist_ok=True)
    if read_only:
        con = _open(path, True, wait_s)
        try:
            yield con
        finally:
            con.close()
        return
    # DuckDB serialises writers across processes by its file lock; threads of one process (mapped Prefect tasks)
    # share one database instance and would hit write-write conflicts instead, or (while one creates the file
    # with its storage setting) a configuration mismatch: writers of one process take turns from the open on.
    with _WRITERS:
        con = _open(path, False, wait_s)
        try:
            ensure_schema(con)
            yield con
        finally:
            con.close()


def ensure_writable(path: Path) -> None:
    """Raise WarehouseLockedError now if another process holds the warehouse (before deleting anything)."""
    with connect(path):
        pass


def write_transaction(path: Path, fn: Callable[[duckdb.DuckDBPyConnection], T], *,
                      wait_s: float | None = None) -> T:
    """Run `fn(con)` inside one transaction: all of its rows land, or none do."""
    with connect(path, wait_s=wait_s) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            result = fn(con)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return result


def replace_version_rows(path: Path, version: str, tables: dict[str, Any]) -> None:
    """Replace one version's rows of several tables in one transaction (one bulk insert per Arrow table)."""

    def write(con: duckdb.DuckDBPyConnection) -> None:
        for name, data in tables.items():
            con.execute(f"DELETE FROM {name} WHERE version = ?", [version])
            con.register("incoming", data)
            con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM incoming")
            con.unregister("incoming")
            maybe_kill(f"db.inserted.{name}")  # inside the transaction: a kill here must roll back

    write_transaction(path, write)


def upsert_artifact(
    path: Path,
    *,
    stage: str,
    version: str,
    parents: list[str],
    config: dict[str, Any],
    status: str,
    rows: int | None = None,
    bytes_: int | None = None,
    artifact_dir: str | None = None,
    summary: dict[str, Any] | None = None,
    completed_at: float | None = None,
    created_at: float | None = None,
) -> None:
    """Insert or update one artifact row in a single transaction (created_at is kept on update).

    `completed_at` and `created_at` are Unix times (a complete version's: its manifest's `completed_at`); None
    means now. `completed_at` is recorded only for status 'complete'.
    """

    def write(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(
            """
            INSERT INTO artifacts (stage, version, parents, config, status, rows, bytes, path, summary,
                                   created_at, completed_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, coalesce(to_timestamp(?::DOUBLE), current_timestamp),
                    CASE WHEN ? = 'complete' THEN coalesce(to_timestamp(?::DOUBLE), current_timestamp) END)
            ON CONFLICT (version) DO UPDATE SET
                status = excluded.status, rows = excluded.rows, bytes = excluded.bytes,
                summary = excluded.summary, path = excluded.path, completed_at = excluded.completed_at
            """,
            [stage, version, parents, json.dumps(config, default=str), status, rows, bytes_, artifact_dir,
             json.dumps(json_safe(summary or {}), default=str), created_at, status, completed_at],
        )

    write_transaction(path, write)


def mark_failed(path: Path, version: str) -> None:
    """Mark a version that was running as failed (a stage raised); a complete version is left alone."""
    if not path.exists():
        return
    write_transaction(path, lambda con: con.execute(
        "UPDATE artifacts SET status = 'failed' WHERE version = ? AND status = 'running'", [version]))


def is_registered_complete(path: Path, version: str) -> bool:
    """Return whether the warehouse registers `version` as complete (False without a warehouse or a row).

    The warehouse is an index: this says whether it holds the version's rows, never whether the version is complete
    (its manifest alone says that).
    """
    if not path.exists():
        return False
    with connect(path, read_only=True) as con:
        try:
            row = con.execute("SELECT status FROM artifacts WHERE version = ?", [version]).fetchone()
        except duckdb.CatalogException:
            return False
    return row is not None and row[0] == "complete"


def list_artifacts(path: Path) -> list[dict[str, Any]]:
    """Return every registered artifact, newest first (empty if the warehouse does not exist yet)."""
    if not path.exists():
        return []
    with connect(path, read_only=True) as con:
        cur = con.execute(
            "SELECT stage, version, status, rows, bytes, path, created_at, completed_at, parents "
            "FROM artifacts ORDER BY created_at DESC"
        )
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
