"""The `loralens` command line: run the pipeline, show artifact status."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loralens.config import ConfigError, default_home, load_config
from loralens.lens.adapters import UnsupportedArchitectureError
from loralens.lens.models import ModelLoadError
from loralens.warehouse.artifacts import ArtifactDir, ArtifactError
from loralens.warehouse.constants import ARTIFACTS_DIR
from loralens.warehouse.corpus import CorpusError
from loralens.warehouse.db import WarehouseLockedError, list_artifacts, warehouse_path

# Errors a user can fix; they print as one line instead of a traceback.
USER_ERRORS = (ConfigError, CorpusError, ModelLoadError, UnsupportedArchitectureError, ArtifactError,
               WarehouseLockedError)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Return rows as a plain-text table with aligned columns."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def human_bytes(n: int | None) -> str:
    """Return a byte count like '12.3 MB'."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def cmd_run(args: argparse.Namespace) -> int:
    from loralens.flows.pipeline import pipeline

    cfg = load_config(args.config)  # validate before Prefect starts its server
    overrides = {"home": str(args.home)} if args.home else None
    results = pipeline(config_path=args.config, config=overrides, only=args.only, force=args.force)
    rows = []
    for stage, res in results.items():
        rows.append({"stage": stage, "version": res["version"], "result": "cached" if res.get("cached") else "done",
                     "tokens": res.get("n_tokens", ""), "path": res.get("path", "")})
    print(format_table(rows, ["stage", "version", "result", "tokens", "path"]))
    print(f"warehouse: {warehouse_path(Path(args.home) if args.home else cfg.home)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve() if args.home else load_config(args.config).home
    registered = {a["version"]: a for a in list_artifacts(warehouse_path(home))}
    rows = []
    for stage_dir in sorted((home / ARTIFACTS_DIR).glob("*")):
        for vdir in sorted(stage_dir.iterdir()):
            adir = ArtifactDir(home, stage_dir.name, vdir.name)
            reg = registered.get(vdir.name, {})
            state = "complete" if adir.is_complete() else f"incomplete ({len(adir.done_shards())} shards done)"
            rows.append({"stage": stage_dir.name, "version": vdir.name, "state": state,
                         "rows": reg.get("rows") or "-", "size": human_bytes(adir.size_bytes()),
                         "created": str(reg.get("created_at", "-"))[:19]})
    if not rows:
        print(f"no artifacts under {home}")
        return 0
    print(format_table(rows, ["stage", "version", "state", "rows", "size", "created"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `loralens` command."""
    parser = argparse.ArgumentParser(prog="loralens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (each stage skipped when its version is complete)")
    run.add_argument("--config", help="YAML config file (defaults: embedded SmolLM2, bundled prompts)")
    run.add_argument("--only", help="run only this stage")
    run.add_argument("--force", action="store_true", help="redo the stage(s) even if complete")
    run.add_argument("--home", help=f"project home (default $LORALENS_HOME or {default_home()})")
    run.set_defaults(fn=cmd_run)
    status = sub.add_parser("status", help="show every stage's versions, state and size")
    status.add_argument("--config")
    status.add_argument("--home")
    status.set_defaults(fn=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loralens` console command."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as err:
        print(f"loralens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
