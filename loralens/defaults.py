"""Defaults the command line needs before anything heavy is imported (no pydantic, torch or Prefect here)."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """Return the project's home folder: $LORALENS_HOME or ./.loralens."""
    return Path(os.environ.get("LORALENS_HOME", ".loralens")).expanduser().resolve()
