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

CREATE TABLE IF NOT EXISTS training_curve (
    version  VARCHAR NOT NULL,  -- train artifact version
    step     INTEGER NOT NULL,  -- optimizer step (1-based)
    loss     DOUBLE,            -- training loss at that step, mean over layers and data-parallel ranks
    tokens   BIGINT,            -- tokens consumed by that step over all ranks
    PRIMARY KEY (version, step)
);

CREATE TABLE IF NOT EXISTS lens_fidelity (
    version        VARCHAR NOT NULL, -- train artifact version
    layer          INTEGER NOT NULL,
    head           INTEGER NOT NULL, -- -1: the layer's joint read-out (sum of its head lenses)
    kl_lens        DOUBLE,           -- held-out exact KL(model || trained lens), nats per token
    kl_logit_lens  DOUBLE,           -- same for the untrained logit lens (folded unembedding)
    kl_subset      DOUBLE,           -- layer rows: the top-k + tail subset KL of the trained lens
    tokens         BIGINT,           -- held-out tokens evaluated
    PRIMARY KEY (version, layer, head)
);

CREATE OR REPLACE VIEW lens_fidelity_by_layer AS
SELECT version, layer, kl_lens, kl_logit_lens, kl_lens / kl_logit_lens AS kl_ratio, kl_subset, tokens
FROM lens_fidelity WHERE head = -1;
"""


def ensure_schema(con) -> None:
    """Create every table and view that does not exist yet (safe to call on every connection)."""
    con.execute(SCHEMA_SQL)
