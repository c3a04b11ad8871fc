"""What the commands share: the home a command works on, its version folders, and plain-text tables."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from loralens.defaults import default_home
from loralens.warehouse.constants import ARTIFACTS_DIR

if TYPE_CHECKING:
    from loralens.warehouse.artifacts import ArtifactDir


def home_of(args: argparse.Namespace) -> Path:
    """Return the project home of a command: --home, else the config file's home, else the default."""
    if args.home:
        return Path(args.home).expanduser().resolve()
    if getattr(args, "config", None):
        from loralens.config import load_config

        return load_config(args.config).home
    return default_home()


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


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    """Return query results as an aligned table, CSV or a JSON list of objects."""
    if fmt == "json":
        return json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    return format_table([dict(zip(columns, r, strict=True)) for r in rows], columns) + f"\n({len(rows)} rows)"


def version_dirs(home: Path, stage: str | None = None) -> list[ArtifactDir]:
    """Return every version folder under `home` (of `stage` only, if given), by stage then version.

    Dot-folders are not versions: temp files, gc trash (`.trash-`), a forced rebuild's backup (`.replaced-`).
    """
    from loralens.warehouse.artifacts import ArtifactDir

    out = []
    for stage_dir in sorted((home / ARTIFACTS_DIR).glob("*")):
        if not stage_dir.is_dir() or stage_dir.name.startswith(".") or stage not in (None, stage_dir.name):
            continue
        out += [ArtifactDir(home, stage_dir.name, v.name) for v in sorted(stage_dir.iterdir())
                if v.is_dir() and not v.name.startswith(".")]
    return out
