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

CREATE TABLE IF NOT EXISTS prompts (
    version     VARCHAR NOT NULL,  -- cache artifact version
    prompt_idx  INTEGER NOT NULL,  -- index in the corpus (decodings.prompt_idx)
    prompt_id   VARCHAR,           -- "<file>/<record id>"
    source      VARCHAR,           -- corpus file the prompt came from
    text        VARCHAR,
    toxicity    DOUBLE,            -- the corpus's own score (RealToxicityPrompts: Perspective), NULL if none
    n_tokens    INTEGER,           -- tokens cached (after truncation)
    truncated   BOOLEAN,
    PRIMARY KEY (version, prompt_idx)
);

CREATE TABLE IF NOT EXISTS decodings (
    version     VARCHAR NOT NULL,  -- decode artifact version
    shard       INTEGER NOT NULL,  -- cache shard the positions came from
    prompt_idx  INTEGER NOT NULL,
    position    INTEGER NOT NULL,  -- token position in the prompt (0-based)
    layer       SMALLINT NOT NULL,
    head        SMALLINT NOT NULL,
    lens        VARCHAR NOT NULL,  -- 'trained' (the head's Lora Lens) or 'logit' (untrained logit lens)
    rank        SMALLINT NOT NULL, -- 1 = the head's most likely token under that lens
    token_id    INTEGER NOT NULL,
    token       VARCHAR,           -- the token's surface text (leading space kept)
    logit       REAL,
    prob        REAL               -- probability under the lens's full-vocabulary softmax
);

-- Loaded from the decode version's token_toxicity.parquet (the one vocabulary toxicity), with the attribute
-- version's lexicon and token threshold applied.
CREATE TABLE IF NOT EXISTS vocab_toxicity (
    version     VARCHAR NOT NULL,  -- attribute artifact version
    token_id    INTEGER NOT NULL,
    token       VARCHAR,
    kind        VARCHAR,           -- word | subword | non_word (non_word pieces are not scored: 0)
    score       REAL,              -- scorer's overall-toxicity probability of the stripped lowercase piece
    in_lexicon  BOOLEAN,           -- piece is in the configured lexicon
    toxic       BOOLEAN,           -- score >= attribute.token_threshold or in_lexicon (method dictionary_count)
    PRIMARY KEY (version, token_id)
);

CREATE TABLE IF NOT EXISTS prompt_groups (
    version     VARCHAR NOT NULL,  -- attribute artifact version
    prompt_idx  INTEGER NOT NULL,
    toxicity    DOUBLE,            -- corpus score, or the scorer's score of the prompt text when it has none
    origin      VARCHAR,           -- 'corpus' | 'scorer'
    toxic       BOOLEAN,           -- toxicity >= attribute.prompt_threshold: the contrast's two groups
    PRIMARY KEY (version, prompt_idx)
);

CREATE TABLE IF NOT EXISTS head_scores (
    version  VARCHAR NOT NULL,  -- attribute (select for the causal methods, intervene for 'ablation') version
    layer    INTEGER NOT NULL,
    head     INTEGER NOT NULL,
    method   VARCHAR NOT NULL,  -- lens_contrast | logit_lens_contrast | lens_mean | dictionary_count | direct_logit
                                -- | ablation_tox_drop | attribution_patching | probe_auroc (select)
                                -- | ablation (intervene)
    score    DOUBLE,            -- higher = pushes the model more toward toxic tokens
    rank     INTEGER,           -- 1 = most toxic head under this method (ties share the lower rank)
    PRIMARY KEY (version, method, layer, head)
);

CREATE TABLE IF NOT EXISTS prompt_splits (
    version       VARCHAR NOT NULL,  -- select artifact version (the splits it and its intervene version use)
    split         VARCHAR NOT NULL,  -- corpus (the cache corpus) | selection | evaluation
    prompt_idx    INTEGER NOT NULL,  -- index within the split (evaluation: generations.prompt_idx)
    prompt_id     VARCHAR,           -- "<file>/<record id>"
    text          VARCHAR,           -- the splits are pairwise disjoint by this text
    toxicity      DOUBLE,            -- the corpus's own prompt score, NULL if none
    continuation  VARCHAR,           -- the human continuation the select stage teacher-forces, NULL if none
    PRIMARY KEY (version, split, prompt_idx)
);

CREATE TABLE IF NOT EXISTS selection_path (
    version     VARCHAR NOT NULL,  -- select artifact version
    step        INTEGER NOT NULL,  -- greedy step (1-based); every candidate tried at a step has a row
    try         INTEGER NOT NULL,  -- order tried within the step (by proxy drop)
    layer       INTEGER NOT NULL,
    head        INTEGER NOT NULL,
    proxy_drop  DOUBLE,            -- drop of the teacher-forced toxicity proxy when the head joins the set
    emt         DOUBLE,            -- sampled expected max toxicity on the selection split with the head added
    emt_drop    DOUBLE,            -- paired drop vs the set before this step (same prompts and seeds)
    ppl         DOUBLE,            -- WikiText-2 perplexity with the head added
    ppl_rel     DOUBLE,            -- relative to the unablated model
    accepted    BOOLEAN,           -- the head joined the set
    reason      VARCHAR,           -- accepted | ppl over budget | no sampled drop
    PRIMARY KEY (version, step, try)
);

CREATE TABLE IF NOT EXISTS steering_trials (
    version        VARCHAR NOT NULL,  -- select artifact version
    kind           VARCHAR NOT NULL,  -- head_set | all_heads (every head steered)
    name           VARCHAR NOT NULL,  -- edit:source:a<alpha>:<heads> (all_heads: heads "all")
    heads          VARCHAR,           -- "L21H3,L5H0", or "all"
    edit           VARCHAR,           -- steer | reverse
    source         VARCHAR,           -- contrast | unembed | lens: whose per-head directions
    alpha          DOUBLE,            -- strength (steer: sigmas; reverse: factor)
    n_heads        INTEGER,
    proxy_drop     DOUBLE,            -- drop of the teacher-forced toxicity proxy on the selection split
    ppl_rel        DOUBLE,            -- WikiText-2 perplexity rise, relative
    within_budget  BOOLEAN,           -- ppl_rel within the budget (goal.ppl_rel; all_heads: its own)
    chosen         BOOLEAN,           -- the preregistered condition of its kind
    PRIMARY KEY (version, kind, name)
);

CREATE TABLE IF NOT EXISTS steering_scores (
    version     VARCHAR NOT NULL,  -- select artifact version
    source      VARCHAR NOT NULL,  -- contrast | unembed | lens
    edit        VARCHAR NOT NULL,  -- steer | reverse
    layer       INTEGER NOT NULL,
    head        INTEGER NOT NULL,
    tox_change  DOUBLE,            -- first-order change of the toxicity proxy, the head alone at strength 1
    nll_change  DOUBLE,            -- first-order change of benign WikiText NLL, same edit
    score       DOUBLE,            -- fluency-aware score: toxicity drop per unit NLL rise (higher first)
    PRIMARY KEY (version, source, edit, layer, head)
);

CREATE TABLE IF NOT EXISTS generations (
    version     VARCHAR NOT NULL,  -- intervene artifact version
    condition   VARCHAR NOT NULL,  -- interventions.condition
    prompt_idx  INTEGER NOT NULL,  -- index in the evaluation split (prompt_splits.prompt_idx, split evaluation)
    sample      INTEGER NOT NULL,  -- 0..k-1
    seed        BIGINT,            -- the prompt's sampling seed (the same in every condition: paired comparison)
    prompt      VARCHAR,
    text        VARCHAR,           -- the continuation only
    toxicity    REAL               -- scorer's overall-toxicity probability of the continuation
);

CREATE TABLE IF NOT EXISTS interventions (
    version        VARCHAR NOT NULL, -- intervene artifact version
    condition      VARCHAR NOT NULL, -- baseline | top3:lens_contrast | random3:s0 | ablate:L3H1 | ...
    grp            VARCHAR,          -- baseline | attributed | random | ablation
    kind           VARCHAR,          -- zero | mean | scale | project
    heads          VARCHAR,          -- "L3H1,L5H0"
    n_heads        INTEGER,
    n_prompts      INTEGER,
    k              INTEGER,          -- continuations per prompt
    emt            DOUBLE, emt_low DOUBLE, emt_high DOUBLE,            -- expected maximum toxicity, 95% bootstrap
    tox_prob       DOUBLE, tox_prob_low DOUBLE, tox_prob_high DOUBLE,  -- share of prompts with a continuation >= 0.5
    mean_tox       DOUBLE, mean_tox_low DOUBLE, mean_tox_high DOUBLE,
    emt_delta      DOUBLE, emt_delta_low DOUBLE, emt_delta_high DOUBLE, -- paired vs baseline (same prompts, seeds)
    ppl            DOUBLE,           -- WikiText-2 perplexity under the intervention (NULL for ablation rows)
    emt_rel        DOUBLE,           -- relative change vs baseline
    tox_prob_rel   DOUBLE,
    ppl_rel        DOUBLE,
    PRIMARY KEY (version, condition)
);

CREATE OR REPLACE VIEW top_toxic_heads AS
SELECT version, method, rank, layer, head, score, 'L' || layer || 'H' || head AS head_name
FROM head_scores WHERE rank <= 10;

-- The trained lens's top tokens of each head on toxic prompts, with their vocabulary toxicity.
CREATE OR REPLACE VIEW head_toxic_tokens AS
SELECT a.version AS attribute_version, d.layer, d.head, d.token_id, any_value(d.token) AS token,
       count(*) AS times_in_top_k, avg(d.prob) AS mean_prob, any_value(v.score) AS token_toxicity
FROM artifacts a
JOIN decodings d ON d.version = a.parents[1] AND d.lens = 'trained'
JOIN prompt_groups g ON g.version = a.version AND g.prompt_idx = d.prompt_idx AND g.toxic
JOIN vocab_toxicity v ON v.version = a.version AND v.token_id = d.token_id
WHERE a.stage = 'attribute'
GROUP BY ALL;

CREATE OR REPLACE VIEW lens_fidelity_by_layer AS
SELECT version, layer, kl_lens, kl_logit_lens, kl_lens / kl_logit_lens AS kl_ratio, kl_subset, tokens
FROM lens_fidelity WHERE head = -1;
"""


def ensure_schema(con) -> None:
    """Create every table and view that does not exist yet (safe to call on every connection)."""
    con.execute(SCHEMA_SQL)
