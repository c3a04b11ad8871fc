"""Prefect flows and the `loralens` command line."""

from loralens.prefect_env import configure_prefect_env

configure_prefect_env()
