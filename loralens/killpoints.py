"""Named crash points for the crash-safety tests: SIGKILL the whole pipeline at a chosen point.

`LORALENS_KILL_AT="<point>:<n>"` (n defaults to 1) kills this process's group (the CLI and its training
workers) with SIGKILL the n-th time this process reaches `maybe_kill(<point>)`. Points are named
`<stage>.<moment>` (e.g. `cache.after_record`, `train.mid_checkpoint`) or `db.inserted.<table>`; see
tests/reliability/test_kill_points.py for the list. Unset (always, outside those tests), a call is one
dictionary lookup. A leaf module (os and signal only), so every layer may import it.

For a Dask worker process (which shares the flow's process group): `LORALENS_KILL_SCOPE=process` kills only the
process that reaches the point, and `LORALENS_KILL_ONCE=<file>` kills only if it can create that file, so of all
the processes reaching the point exactly one is killed, once.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def maybe_kill(point: str) -> None:
    """SIGKILL the process group (or this process) if $LORALENS_KILL_AT names `point` and this is its n-th hit."""
    spec = os.environ.get("LORALENS_KILL_AT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] < int(n or 1):
        return
    once = os.environ.get("LORALENS_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if os.environ.get("LORALENS_KILL_SCOPE") == "process":
        os.kill(os.getpid(), signal.SIGKILL)
    os.killpg(os.getpgrp(), signal.SIGKILL)
