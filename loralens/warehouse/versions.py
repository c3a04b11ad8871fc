"""The one artifact-version function: a content hash of what a stage's output depends on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import loralens

# Bump a stage's number when the meaning or layout of its output changes: old versions stay readable
# beside new ones instead of being silently reused.
SCHEMA_VERSIONS: dict[str, int] = {"cache": 1, "train": 1, "decode": 1, "attribute": 1, "select": 1, "intervene": 2}


def canonical_json(obj: Any) -> str:
    """Return a deterministic JSON text (sorted keys, no whitespace, paths and tuples as strings/lists)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def artifact_version(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """Return the version (16 hex chars) of a stage output from its config, its inputs' versions and the code."""
    if stage not in SCHEMA_VERSIONS:
        raise ValueError(f"unknown stage '{stage}'; stages: {', '.join(SCHEMA_VERSIONS)}")
    payload = {
        "stage": stage,
        "schema": SCHEMA_VERSIONS[stage],
        "code": loralens.__version__,
        "config": config,
        "inputs": dict(inputs),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]
