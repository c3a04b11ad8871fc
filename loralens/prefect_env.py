"""Prefect environment defaults, applied before Prefect is imported (no Prefect import here)."""

from __future__ import annotations

import os

PREFECT_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # A cold ephemeral server takes ~13 s on a 2-core machine; Prefect's default leaves little margin.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "loralens",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    # Stage functions also run outside flows (tests, workers); their logs then stay local.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def configure_prefect_env() -> None:
    """Set Prefect's telemetry, start-up and logging defaults unless the user set them."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
