"""What a stage will produce: its version, hashed config and input versions.

A stage's version hashes exactly the science settings it reads (`STAGE_READS`, `science_config`): execution
settings (batch sizes, workers, chunking, device placement) never change a version, since they never change a result.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loralens.config import InterveneConfig, PipelineConfig
from loralens.killpoints import maybe_kill
from loralens.warehouse.artifacts import ArtifactDir, ArtifactError
from loralens.warehouse.constants import MANIFEST
from loralens.warehouse.db import ensure_writable, mark_failed, upsert_artifact, warehouse_path
from loralens.warehouse.gc import remove_folder

if TYPE_CHECKING:
    from loralens.tasks.registry import Stage

log = logging.getLogger("loralens.stage_versions")
# Stages whose resume path would re-record the files already in the folder (train keeps its finished result,
# attribute records all its files as one shard): a corrupted file there means redoing the whole version.
WHOLE_VERSION_STAGES = ("train", "attribute", "select")
# A complete version set aside while --force rebuilds it: `<home>/artifacts/<stage>/.replaced-<version>`
# (a dot-folder, so gc and `loralens status` do not take it for a version).
REPLACED_PREFIX = ".replaced-"
F = TypeVar("F", bound=Callable[..., Any])

# The config sections each stage reads: None means every science field of the section, a tuple the science fields
# it reads of a section another stage owns. Settings that enter a version by content (the model and corpus files,
# the scorer, the lexicon, the prompt splits) are hashed as inputs by the stage's version function instead.
STAGE_READS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "cache": {"model": None, "corpus": None, "cache": None},
    "train": {"train": None},
    "decode": {"decode": None},
    "attribute": {"attribute": None},
    "select": {"select": None, "goal": ("max_head_share", "ppl_rel"),
               "intervene": ("top_p", "max_new_tokens", "seed", "ppl_tokens", "ppl_window")},
    # head_sets is hashed as the conditions it resolves to (the heads), not as written.
    "intervene": {"intervene": tuple(n for n in InterveneConfig.science_fields() if n != "head_sets"), "goal": None},
}


def science_config(cfg: PipelineConfig, stage: str) -> dict[str, dict[str, Any]]:
    """Return, per section, the science settings `stage` reads (`STAGE_READS`): the config its version hashes."""
    out = {section: getattr(cfg, section).science(*(names or ())) for section, names in STAGE_READS[stage].items()}
    if stage == "cache":  # the top-k the cache stores: cache.top_k, or resolved by train.loss when unset
        out["cache"]["top_k"] = cfg.target_top_k
    return out


@dataclass(frozen=True)
class StageVersion:
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

    @classmethod
    def from_manifest(cls, home: Path, manifest: dict[str, Any]) -> StageVersion:
        """Return the version a complete artifact's manifest describes (its stage, version, config and inputs)."""
        return cls(manifest["stage"], manifest["version"], manifest["config"], manifest["inputs"], home)


def require_complete(ver: StageVersion) -> dict[str, Any]:
    """Return an upstream artifact's manifest, or raise naming the stage to run first."""
    manifest = ver.artifact.manifest()
    if manifest is None:
        raise ArtifactError(f"missing upstream artifact: {ver.stage} version {ver.version} is not complete; "
                            f"run `loralens run --only {ver.stage}` first")
    return manifest


@contextmanager
def failures_recorded(ver: StageVersion) -> Iterator[None]:
    """Mark the stage version failed in the warehouse when the stage raises (the error still propagates)."""
    try:
        yield
    except Exception:
        try:
            mark_failed(warehouse_path(ver.home), ver.version)
        except Exception:  # noqa: BLE001 - e.g. the warehouse is the thing that failed; keep the first error
            pass
        raise


def reopen_changed(adir: ArtifactDir, *, full: bool = False) -> list[dict[str, Any]]:
    """Check a complete version's files against its manifest; reopen it if any changed; return those files.

    Quick (default): each file's size and modification time against the manifest, a stat per file. `full`:
    each file's sha256 (reads everything; `loralens verify`, `loralens run --verify`). A changed file never
    counts as done: cache, decode and intervene reopen just the bad shards (the stage redoes them); train and
    attribute start the version over (see WHOLE_VERSION_STAGES).
    """
    bad = adir.reopen_corrupt_shards(full=full)
    if not bad:
        return []
    what = "its checksum" if full else "its recorded size/mtime"
    if adir.stage in WHOLE_VERSION_STAGES:
        log.warning("%s %s: %s failed %s; redoing the version", adir.stage, adir.version, bad[0]["path"], what)
        adir.reset()
    else:
        shards = sorted({int(f["shard"]) for f in bad})
        log.warning("%s %s: %d file(s) failed %s; redoing shard(s) %s", adir.stage, adir.version, len(bad), what,
                    shards)
    return bad


def reverify_on_reuse(ver: StageVersion, *, full: bool = False) -> bool:
    """Re-check a complete version before reuse (`reopen_changed`); return True if it was reopened."""
    return bool(reopen_changed(ver.artifact, full=full))


def stage_of(ver: StageVersion) -> Stage:
    """Return the registered stage of a version (tasks/registry.py: its lineage, rows key, summary and store).

    Looked up when called: the registry imports every stage module, and they import this one.
    """
    from loralens.tasks.registry import get_stage

    return get_stage(ver.stage)


def register(ver: StageVersion, status: str) -> None:
    """Insert or update the version's `artifacts` row as running or failed, naming its parents (its stage's
    lineage), in one transaction; a complete version: `register_complete`."""
    upsert_artifact(warehouse_path(ver.home), stage=ver.stage, version=ver.version,
                    parents=stage_of(ver).lineage(ver), config=ver.config, status=status,
                    artifact_dir=str(ver.artifact.path))


def register_complete(ver: StageVersion, manifest: dict[str, Any], *, db: Path | None = None,
                      created_at: float | None = None) -> None:
    """Register a version complete from its manifest, the record of completion: its stage's row count, its bytes,
    its summary and when it completed (one transaction). `db` defaults to the home's warehouse; `created_at`
    (Unix time) to now for a new row (an existing row keeps its own)."""
    stage = stage_of(ver)
    upsert_artifact(db or warehouse_path(ver.home), stage=ver.stage, version=ver.version, parents=stage.lineage(ver),
                    config=ver.config, status="complete", rows=manifest["summary"][stage.rows_key],
                    bytes_=manifest["total_bytes"], artifact_dir=str(ver.artifact.path),
                    summary=stage.summary(manifest), completed_at=manifest["completed_at"], created_at=created_at)


def index_version(ver: StageVersion, manifest: dict[str, Any], *, db: Path | None = None,
                  created_at: float | None = None) -> None:
    """Load a complete version's warehouse rows from its folder (its stage's idempotent `store`) and register it
    complete from its manifest; `db` and `created_at` as in `register_complete`."""
    stage_of(ver).store(db or warehouse_path(ver.home), ver)
    register_complete(ver, manifest, db=db, created_at=created_at)


def reuse_complete(ver: StageVersion, manifest: dict[str, Any], *, worker: bool = False) -> dict[str, Any]:
    """Return the summary of a complete version reused as it is, after indexing it again (`index_version`: the
    warehouse may have lost its rows). `worker`: one worker's share of a split run, which writes Parquet only
    (the finalizing run indexes)."""
    if not worker:
        index_version(ver, manifest)
    return {"version": ver.version, "path": str(ver.artifact.path), "cached": True, **stage_of(ver).summary(manifest)}


def replaced_path(adir: ArtifactDir) -> Path:
    """Return where a forced rebuild keeps the old complete version until the new one is complete."""
    return adir.path.with_name(f"{REPLACED_PREFIX}{adir.version}")


def restore_replaced(adir: ArtifactDir) -> bool:
    """Settle a forced rebuild's backup, if any; return True if the old version was put back.

    The new version complete (manifest written): the backup goes. Otherwise (the rebuild failed, or was killed)
    the half-built folder goes and the old complete version is renamed back: it wins over a partial one. Each
    step is one rename or a removal via a `.trash-` name, so a kill at any point leaves a state this settles.
    """
    backup = replaced_path(adir)
    if not backup.exists():
        return False
    if adir.is_complete() or not (backup / MANIFEST).exists():
        remove_folder(backup)
        return False
    remove_folder(adir.path)
    os.replace(backup, adir.path)
    log.warning("%s %s: the forced rebuild did not complete; the previous complete version is back",
                adir.stage, adir.version)
    return True


_guarded: set[Path] = set()  # versions inside a `keeping_old_version` block of this process (threads share it)
_guarded_lock = threading.Lock()


@contextmanager
def keeping_old_version(ver: StageVersion) -> Iterator[None]:
    """Run a stage (or a split stage's workers and finalizer) so that --force never costs a complete version.

    On entry and on exit (normal or raising), `restore_replaced`: a backup left by a killed forced run is
    settled before anything is decided, and this block's own rebuild either completed (backup deleted) or
    did not (backup restored). Nested blocks for the same version (flow -> task -> stage) are no-ops.
    """
    key = ver.artifact.path
    with _guarded_lock:
        outer = key in _guarded
        _guarded.add(key)
    if outer:
        yield
        return
    try:
        restore_replaced(ver.artifact)
        try:
            yield
        finally:
            restore_replaced(ver.artifact)
    finally:
        with _guarded_lock:
            _guarded.discard(key)


def keeps_old_version(worker_arg: str | None = None) -> Callable[[F], F]:
    """Decorate a `run_<stage>_stage(cfg, ver, ...)` to run inside `keeping_old_version(ver)`.

    Calls with `worker_arg` set (one worker's share of a split run) run as they are: the split's owner guards
    the version, and a worker must never restore a backup beside a folder that other workers are filling.
    """
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(cfg: Any, ver: StageVersion, *args: Any, **kwargs: Any) -> Any:
            if worker_arg is not None and kwargs.get(worker_arg) is not None:
                return fn(cfg, ver, *args, **kwargs)
            with keeping_old_version(ver):
                return fn(cfg, ver, *args, **kwargs)
        return run  # type: ignore[return-value]
    return decorate


def reset_for_force(ver: StageVersion) -> None:
    """Start the stage version over for --force, after checking the warehouse is writable (a locked warehouse
    must not cost the old artifact). Call it after the stage's inputs are checked.

    A complete version is renamed aside (`replaced_path`), not deleted: inside `keeping_old_version` it comes back
    if the rebuild does not complete, and goes once it does. An incomplete one is deleted.
    """
    ensure_writable(warehouse_path(ver.home))
    adir = ver.artifact
    restore_replaced(adir)  # at most one backup per version: settle any older one first
    if adir.is_complete():
        os.replace(adir.path, replaced_path(adir))
        maybe_kill(f"{adir.stage}.after_set_aside")
    else:
        adir.reset()
