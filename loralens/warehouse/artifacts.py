"""A versioned artifact folder: atomic shard files, per-shard records with checksums, manifest last.

A shard counts as done only when its record exists and every file it lists is unchanged: same size and
modification time (st_mtime_ns, stamped when the record is written) as recorded, and with `full=True` the same
sha256 too (`loralens verify`, `loralens run --verify`). The manifest, written last by `finalize`, is the only
thing that marks the whole artifact complete.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from loralens.hashing import file_sha256
from loralens.killpoints import maybe_kill
from loralens.warehouse.constants import ARTIFACTS_DIR, MANIFEST, SHARD_RECORDS_DIR, TMP_PREFIX, shard_name
from loralens.warehouse.json_values import json_safe

_LIBRARIES = ("loralens", "torch", "transformers", "peft", "deepspeed", "prefect", "pyarrow", "duckdb")


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or not writable."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and rename the result to `path`, leaving nothing behind on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}"
    try:
        write(tmp)
        maybe_kill("atomic_write.before_rename")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def library_versions() -> dict[str, str]:
    """Return the installed versions of the libraries an artifact depends on."""
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class ShardFile:
    """One file of a shard, relative to the artifact folder, with its rows, size, checksum and mtime.

    `mtime_ns` is stamped by `ArtifactDir.record_shard`; None in records written before it existed (then a
    quick check compares the size only).
    """

    path: str
    rows: int
    bytes: int
    sha256: str
    mtime_ns: int | None = None


def unchanged(path: Path, f: ShardFile | dict[str, Any], *, full: bool = False) -> bool:
    """Return True if the file at `path` still is the recorded one `f` (a ShardFile or a manifest entry).

    Quick (default): it exists with the recorded size and, when recorded, modification time (a stat, no read).
    A file whose mtime moved with its size unchanged (a home copied without timestamps, a restored backup) is
    compared by content once: the same sha256 still counts as unchanged, and `ArtifactDir` re-stamps its record
    so the next check is a stat again.
    `full`: the size and the sha256 of its content (reads the whole file); the mtime is not needed then.
    """
    rec = f if isinstance(f, dict) else asdict(f)
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    if st.st_size != rec["bytes"]:
        return False
    if not full and (rec.get("mtime_ns") is None or st.st_mtime_ns == rec["mtime_ns"]):
        return True
    return file_sha256(path) == rec["sha256"]


def artifact_path(home: Path, stage: str, version: str) -> Path:
    """Return the folder of one stage version under the project's home."""
    return home / ARTIFACTS_DIR / stage / version


class ArtifactDir:
    """The folder of one stage version, e.g. `<home>/artifacts/cache/<version>/`."""

    def __init__(self, home: Path, stage: str, version: str) -> None:
        self.stage = stage
        self.version = version
        self.path = artifact_path(home, stage, version)

    # -- state ---------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """Return the manifest, or None while the artifact is incomplete."""
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None

    def is_complete(self) -> bool:
        """Return True when the manifest exists (it is written last)."""
        return (self.path / MANIFEST).exists()

    def prepare(self, *, clean_tmp: bool = True) -> None:
        """Create the folder (checking it is writable) and drop temp files left by a killed run.

        `clean_tmp=False` for workers that share the folder with others still writing (shard-split runs).
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # A probe unique to this process and thread: concurrent shard workers prepare the same folder.
            fd, probe = tempfile.mkstemp(prefix=f"{TMP_PREFIX}probe-", dir=self.path)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ArtifactError(f"cannot write artifact folder {self.path}: {err.strerror}") from None
        if clean_tmp:
            for tmp in list(self.path.rglob(f"{TMP_PREFIX}*")):  # files, and folders (train's .tmp-lenses)
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)

    def reset(self) -> None:
        """Delete everything of this version (for --force)."""
        shutil.rmtree(self.path, ignore_errors=True)

    # -- shards --------------------------------------------------------------------------------
    def _record_path(self, index: int) -> Path:
        return self.path / SHARD_RECORDS_DIR / f"{shard_name(index)}.json"

    def shard_files(self, index: int, *, full: bool = False) -> list[ShardFile] | None:
        """Return a done shard's files, or None if it is missing or any file changed (see `unchanged`)."""
        try:
            record = json.loads(self._record_path(index).read_text())
        except (FileNotFoundError, ValueError):
            return None
        files = [ShardFile(**f) for f in record["files"]]
        if not all(unchanged(self.path / f.path, f, full=full) for f in files):
            return None
        return self._restamp(index, files)

    def _restamp(self, index: int, files: list[ShardFile]) -> list[ShardFile]:
        """Rewrite a done shard's record with its files' current mtimes if any moved (content already checked)."""
        stamped = [f if f.mtime_ns is None else replace(f, mtime_ns=self._mtime_ns(f.path)) for f in files]
        if stamped != files:
            record = json.loads(self._record_path(index).read_text())
            record["files"] = [f.__dict__ for f in stamped]
            atomic_write_bytes(self._record_path(index), json.dumps(record, indent=1).encode())
        return stamped

    def reopen_corrupt_shards(self, *, full: bool = False) -> list[dict[str, Any]]:
        """Re-check a complete version's files against its manifest (quick: size and mtime; `full`: sha256);
        if any changed, make the version incomplete again. Return the manifest entries of the changed files
        (each names its `shard`; empty when all is well or the version is incomplete).

        The manifest goes first (the version stops counting as complete), then the bad shards' records, so the
        stage redoes exactly those shards.
        """
        manifest = self.manifest()
        if manifest is None:
            return []
        # The mtimes are in the shard records (the manifest describes content only: the same data, the same
        # manifest); a file whose record is gone counts as changed.
        stamps = {(i, f.path): f.mtime_ns for i, fs in self.done_shards().items() for f in fs}

        def ok(f: dict[str, Any]) -> bool:
            key = (int(f["shard"]), f["path"])
            return key in stamps and unchanged(self.path / f["path"], f | {"mtime_ns": stamps[key]}, full=full)

        bad = [f for f in manifest["files"] if not ok(f)]
        bad_shards = {int(f["shard"]) for f in bad}
        for index, files in self.done_shards().items():
            if index not in bad_shards:
                self._restamp(index, files)
        if bad:
            (self.path / MANIFEST).unlink(missing_ok=True)
            for index in sorted({int(f["shard"]) for f in bad}):
                self._record_path(index).unlink(missing_ok=True)
        return bad

    def discard_shard(self, index: int, relpaths: list[str]) -> None:
        """Remove a shard's record first (so it stops counting as done), then its files."""
        self._record_path(index).unlink(missing_ok=True)
        for rel in relpaths:
            (self.path / rel).unlink(missing_ok=True)

    def record_shard(self, index: int, files: list[ShardFile]) -> None:
        """Mark a shard done; call only after all its files are in place (their mtimes are stamped now)."""
        maybe_kill(f"{self.stage}.before_record")
        files = [replace(f, mtime_ns=self._mtime_ns(f.path)) for f in files]
        payload = {"shard": index, "files": [f.__dict__ for f in files], "written_at": time.time()}
        atomic_write_bytes(self._record_path(index), json.dumps(payload, indent=1).encode())
        maybe_kill(f"{self.stage}.after_record")

    def _mtime_ns(self, rel: str) -> int | None:
        try:
            return (self.path / rel).stat().st_mtime_ns
        except FileNotFoundError:
            return None  # a record of a file not (yet) there never counts as done: `unchanged` needs it to exist

    def done_shards(self) -> dict[int, list[ShardFile]]:
        """Return every shard record present (without re-verifying checksums)."""
        out = {}
        for rec in sorted((self.path / SHARD_RECORDS_DIR).glob("shard-*.json")):
            data = json.loads(rec.read_text())
            out[int(data["shard"])] = [ShardFile(**f) for f in data["files"]]
        return out

    def finalize(self, *, config: dict[str, Any], inputs: dict[str, str], summary: dict[str, Any]) -> dict:
        """Write manifest.json last, listing every shard's files, rows, sizes and checksums; return it."""
        maybe_kill(f"{self.stage}.before_manifest")
        shards = self.done_shards()
        # mtime_ns stays in the shard records: it describes this copy of a file, not its content.
        files = [{k: v for k, v in asdict(f).items() if k != "mtime_ns"} | {"shard": i}
                 for i, fs in shards.items() for f in fs]
        manifest = {
            "stage": self.stage,
            "version": self.version,
            "config": config,
            "inputs": inputs,
            "n_shards": len(shards),
            "files": files,
            "total_bytes": sum(f["bytes"] for f in files),
            "summary": json_safe(summary),
            "libraries": library_versions(),
            "completed_at": time.time(),
        }
        atomic_write_bytes(self.path / MANIFEST, json.dumps(manifest, indent=1).encode())
        maybe_kill(f"{self.stage}.after_manifest")
        return manifest

    def size_bytes(self) -> int:
        """Return the bytes on disk under this version's folder."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
