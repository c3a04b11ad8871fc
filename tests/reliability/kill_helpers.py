"""Helpers of the kill-point suite: a fork server that runs `loralens run` in fresh processes, and a
fingerprint of a project home (artifacts and warehouse) that two runs of the same config must share.

The fork server imports torch, transformers, Prefect and every stage once (~3-5 s on 2 cores), then forks
one child per job. Each child is a new session (so the pipeline's `maybe_kill` SIGKILLs exactly that child and
its training workers), writes stdout/stderr to a log, runs `loralens.flows.cli.main(argv)` and exits with its
code, like `python -m loralens.flows.cli ...` would. The server never runs a flow or a tensor op itself, so the
children start from a clean, thread-free state. Run as a script (`python kill_helpers.py serve`).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# Values that legitimately differ between two runs of the same config: wall-clock times and what a resumed run
# reports about its own resumption. Everything else in a JSON file under artifacts/ must be identical.
VOLATILE_KEYS = frozenset({
    "written_at", "completed_at", "time",  # shard records, manifests, checkpoint markers
    "seconds", "seconds_setup", "seconds_loop", "seconds_vocab", "seconds_generate",  # stage summaries
    "seconds_by_method",
    "train_seconds", "tokens_per_s", "train_timing",  # train result
    "resumed_from", "shards_redone",  # how a resumed run got there, not what it produced
    "mtime_ns",  # shard records: when this copy of a file was written
})
# Warehouse columns left out of the comparison: timestamps of the run itself.
VOLATILE_COLUMNS = {"artifacts": ("created_at", "completed_at")}
# Tables without a primary key, and the columns that identify one of their rows.
NATURAL_KEYS = {
    "decodings": ("version", "shard", "prompt_idx", "position", "layer", "head", "lens", "rank"),
    "generations": ("version", "condition", "prompt_idx", "sample"),
}


# -- the fork server ------------------------------------------------------------------------------------------
def serve() -> None:
    """Import everything once, then run one CLI job per stdin line in a forked child; report pid and exit code."""
    proto = os.fdopen(os.dup(1), "w")  # the answers; stray prints of imported libraries go to stderr instead
    os.dup2(2, 1)
    import loralens.flows.cli as cli
    import loralens.flows.pipeline  # noqa: F401  (the heavy imports happen here, once)
    import loralens.tasks.stages.attribute  # noqa: F401
    import loralens.tasks.stages.intervene  # noqa: F401

    def answer(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    answer({"ready": os.getpid()})
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: a fresh session whose only job is this CLI run
            code = 1
            try:
                os.setsid()
                proto.close()
                log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.environ.update(job["env"])
                code = cli.main(job["argv"])
            except SystemExit as err:
                code = err.code if isinstance(err.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        answer({"pid": pid})
        _, status = os.waitpid(pid, 0)
        try:
            os.killpg(pid, signal.SIGKILL)  # anything its session left behind (a training worker, normally none)
        except (ProcessLookupError, PermissionError):
            pass
        answer({"rc": os.waitstatus_to_exitcode(status)})


class ForkServer:
    """Client of `serve()`: `run(argv, env, log)` returns the child's exit code (-9: it was SIGKILLed)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=REPO, bufsize=0)
        self._buf = b""
        self._read(180)

    def _read(self, timeout: float) -> dict[str, Any]:
        """Return the server's next answer line (unbuffered: select() must see every byte not yet read)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"fork server gave no answer in {timeout:.0f} s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"fork server exited with code {self.proc.wait()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], *, env: dict[str, str], log: Path, timeout: float = 240) -> int:
        self.proc.stdin.write((json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n").encode())
        self.proc.stdin.flush()
        pid = self._read(30)["pid"]
        try:
            return self._read(timeout)["rc"]
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)
            self._read(30)
            raise

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- fingerprints ---------------------------------------------------------------------------------------------
def _normalize(value: Any, homes: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _normalize(v, homes) for k, v in sorted(value.items()) if k not in VOLATILE_KEYS}
    if isinstance(value, list | tuple):
        return [_normalize(v, homes) for v in value]
    if isinstance(value, str):
        for home in homes:
            value = value.replace(home, "<home>")
    return value


def _file_digest(path: Path, homes: tuple[str, ...]) -> str:
    if path.suffix == ".json":  # records, manifests, summaries: compared without times, paths made relative
        text = json.dumps(_normalize(json.loads(path.read_text()), homes), sort_keys=True)
    elif path.name == "curve.jsonl":  # an append log: a resumed run repeats the steps after its checkpoint
        last = {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}
        text = json.dumps([last[s] for s in sorted(last)])
    else:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(text.encode()).hexdigest()


def artifact_fingerprint(home: Path, *other_homes: Path) -> dict[str, str]:
    """Return relative path -> digest of every file under `home/artifacts` (JSON normalized, see VOLATILE_KEYS;
    paths under `home` or `other_homes`, where copied artifacts come from, read `<home>`)."""
    root = home / "artifacts"
    homes = tuple(str(h) for h in (home, *other_homes))
    return {str(p.relative_to(root)): _file_digest(p, homes) for p in sorted(root.rglob("*")) if p.is_file()}


def tables(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                      "WHERE table_type = 'BASE TABLE' ORDER BY 1").fetchall()]


def warehouse_fingerprint(home: Path, *other_homes: Path) -> dict[str, list]:
    """Return every warehouse table's rows, sorted, with paths made relative and JSON columns normalized."""
    import duckdb

    homes = tuple(str(h) for h in (home, *other_homes))
    out = {}
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        for table in tables(con):
            cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()
                    if r[0] not in VOLATILE_COLUMNS.get(table, ())]
            rows = con.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall()
            norm = []
            for row in rows:
                vals = []
                for col, v in zip(cols, row, strict=True):
                    if table == "artifacts" and col in ("summary", "config") and v is not None:
                        v = json.loads(v)
                    vals.append(_normalize(v, homes))
                norm.append(json.dumps(vals, sort_keys=True, default=str))
            out[table] = sorted(norm)
    return out


def duplicate_rows(home: Path) -> dict[str, int]:
    """Return, per table without a primary key, how many rows repeat another row's key (0 everywhere is right)."""
    import duckdb

    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        return {t: con.execute(f"SELECT count(*) - count(DISTINCT ({', '.join(k)})) FROM {t}").fetchone()[0]
                for t, k in NATURAL_KEYS.items()}


def drop_version(home: Path, stage: str, version: str) -> None:
    """Remove one stage version from a home: its folder and its rows in every warehouse table."""
    import shutil

    import duckdb

    shutil.rmtree(home / "artifacts" / stage / version)
    with duckdb.connect(str(home / "warehouse.duckdb")) as con:
        for table in tables(con):
            if "version" in [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]:
                con.execute(f"DELETE FROM {table} WHERE version = ?", [version])


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
