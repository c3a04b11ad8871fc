"""The warehouse schema: every DuckDB table and view, created idempotently from this one module."""

from __future__ import annotations

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS artifacts (
    stage         VARCHAR NOT NULL,   -- pipeline stage: cache, train, decode, attribute, intervene
    version       VARCHAR PRIMARY KEY,-- content hash of (stage, config, input versions, schema, code)
    parents       VARCHAR[],          -- versions of the artifacts this one was computed from
    config        JSON,               -- the stage's validated config
    status        VARCHAR NOT NULL,   -- running | complete | failed
    rows          BIGINT,             -- rows written (cache: cached tokens)
    bytes         BIGINT,             -- bytes on disk
    path          VARCHAR,            -- artifact folder
    summary       JSON,               -- stage-specific counts (prompts, truncated, skipped, ...)
    created_at    TIMESTAMP DEFAULT current_timestamp,
    completed_at  TIMESTAMP
);
"""


def ensure_schema(con) -> None:
    """Create every table and view that does not exist yet (safe to call on every connection)."""
    con.execute(SCHEMA_SQL)
