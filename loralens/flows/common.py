"""Shared flow helpers: config resolution and per-home result storage for cached tasks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from loralens.config import PipelineConfig, load_config, parse_config


def resolve_config(config_path: str | None = None, config: dict[str, Any] | None = None) -> PipelineConfig:
    """Return the validated config from a file, with `config` mapping keys laid over it."""
    base = load_config(config_path)
    if not config:
        return base
    merged = base.model_dump(mode="json")
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return parse_config(merged)


@contextmanager
def results_under_home(cfg: PipelineConfig) -> Iterator[None]:
    """Persist Prefect task results under the project home while the block runs."""
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(cfg.home / "prefect-results")}):
        yield
