"""Start-up time of the `loralens` command: wall seconds of whole processes, best and median of `--rounds`.

Each command runs as a fresh `python -m loralens.flows.cli ...` process (what the console script does), against a
throw-away home with an empty warehouse; the interpreter alone and the heavy imports the CLI avoids are measured
beside it for scale. Prints a table, writes JSON. Runs the `loralens` found first on the path (PYTHONPATH).

    python benchmarks/cli_startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import loralens
from loralens.warehouse.db import connect, warehouse_path


def wall(cmd: list[str], rounds: int, env: dict[str, str]) -> list[float]:
    """Return the wall seconds of `rounds` runs of `cmd`; empty if it fails (a command this version lacks)."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if proc.returncode != 0:
            return []
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="loralens-cli-bench-"))
    with connect(warehouse_path(home)):  # an empty warehouse (schema only)
        pass
    env = dict(os.environ)
    cli = [sys.executable, "-m", "loralens.flows.cli"]
    cases = {
        "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
        "loralens --help": [*cli, "--help"],
        "loralens run --help": [*cli, "run", "--help"],
        "loralens inspect --help": [*cli, "inspect", "--help"],
        "loralens status --home H": [*cli, "status", "--home", str(home)],
        "loralens sql 'SELECT count(*) FROM artifacts' --home H": [*cli, "sql", "SELECT count(*) FROM artifacts",
                                                                   "--home", str(home)],
        "python -c 'import torch' (avoided)": [sys.executable, "-c", "import torch"],
        "python -c 'import prefect' (avoided)": [sys.executable, "-c", "import prefect"],
    }
    wall(cases["loralens --help"], 1, env)  # warm the file cache
    rows = []
    for name, cmd in cases.items():
        times = wall(cmd, args.rounds, env)
        rows.append({"command": name, "best_s": min(times, default=None),
                     "median_s": statistics.median(times) if times else None, "runs": times})

    width = max(len(r["command"]) for r in rows)
    print(f"loralens {loralens.__version__} from {Path(loralens.__file__).parent}; {args.rounds} runs each, "
          f"{os.cpu_count()} CPUs")
    print(f"{'command':<{width}}  {'best s':>7}  {'median s':>8}")
    for r in rows:
        if not r["runs"]:
            print(f"{r['command']:<{width}}  {'failed':>7}  {'-':>8}")
            continue
        print(f"{r['command']:<{width}}  {r['best_s']:>7.3f}  {r['median_s']:>8.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cli_startup.json"
    path.write_text(json.dumps({"package": str(Path(loralens.__file__).parent), "rounds": args.rounds,
                                "python": platform.python_version(), "machine": platform.machine(),
                                "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
