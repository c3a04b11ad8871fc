"""Prefect tasks: thin wrappers that wire `lens` (the ML) to `warehouse` (storage)."""

from loralens.prefect_env import configure_prefect_env

configure_prefect_env()
