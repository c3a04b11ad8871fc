"""The `attribute` stage: prompt groups and per-head toxicity scores from decode's single pass, into DuckDB.

The vocabulary toxicity is decode's (`token_toxicity.parquet`); this stage applies its lexicon and token threshold
to it (the toxic tokens of `dictionary_count`) and loads the result into the `vocab_toxicity` table, no copy.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from loralens.config import ConfigError, PipelineConfig
from loralens.hashing import file_sha256
from loralens.lens.evaluation.scorers import ToxicityScorer, get_scorer, primary_label
from loralens.lens.evaluation.vocab_toxicity import load_lexicon, scoring_key
from loralens.lens.heads import head_scores as A
from loralens.tasks.lens_loading import cached_layers
from loralens.tasks.memory import ensure_fits
from loralens.tasks.report import score_heatmap, top_heads_markdown
from loralens.tasks.stage_versions import (
    StageVersion,
    failures_recorded,
    keeps_old_version,
    register,
    register_complete,
    require_complete,
    reset_for_force,
    reuse_complete,
    science_config,
)
from loralens.tasks.stages.decode import token_scorer_version
from loralens.warehouse.activation_cache import read_prompts
from loralens.warehouse.artifacts import ArtifactDir, atomic_write_bytes
from loralens.warehouse.attribution_tables import (
    head_scores_table,
    prompt_groups_table,
    store_attribution,
    token_flags_table,
    vocab_table,
)
from loralens.warehouse.constants import (
    ATTRIBUTION_SUMMARY,
    HEAD_SCORES_FILE,
    PROMPT_GROUPS_FILE,
    TMP_PREFIX,
    TOKEN_FLAGS_FILE,
    TOP_HEADS_REPORT,
    heatmap_name,
)
from loralens.warehouse.db import warehouse_path
from loralens.warehouse.decodings import decode_shards, read_token_toxicity
from loralens.warehouse.head_aggregates import dictionary_hits, group_sums
from loralens.warehouse.head_aggregates import top_tokens as top_tokens_of
from loralens.warehouse.parquet_files import write_parquet_file
from loralens.warehouse.versions import artifact_version

log = logging.getLogger("loralens.attribute")
STAGE = "attribute"


def attribute_version(cfg: PipelineConfig, decode_ver: StageVersion) -> StageVersion:
    """Return the attribute version: its science settings, the decode version, the scorer and lexicon content."""
    a = cfg.attribute
    # The scorer also scores prompts without a corpus toxicity here (decode already hashes it for the vocabulary).
    inputs = {"decode": decode_ver.version, "scorer": token_scorer_version(cfg)}
    if a.lexicon is not None:
        if Path(a.lexicon).is_dir():
            raise ConfigError(f"config error: attribute.lexicon: is a folder, not a file: {a.lexicon}")
        if not Path(a.lexicon).is_file():
            raise ConfigError(f"config error: attribute.lexicon: file not found: {a.lexicon}")
        inputs["lexicon"] = file_sha256(Path(a.lexicon))
    config = science_config(cfg, STAGE)
    return StageVersion(STAGE, artifact_version(STAGE, config, inputs), config, inputs, cfg.home)


def prompt_groups(prompts: dict[str, np.ndarray], make_scorer: Callable[[], ToxicityScorer]
                  ) -> tuple[np.ndarray, list[str]]:
    """Return per-prompt toxicity (corpus score, else the scorer's score of the prompt text) and its origin.

    `make_scorer` is called only when some prompt has no corpus score.
    """
    tox = np.array([np.nan if t is None else float(t) for t in prompts["toxicity"]], dtype=np.float64)
    missing = np.flatnonzero(np.isnan(tox))
    origin = ["corpus"] * len(tox)
    if len(missing):
        texts = [prompts["text"][i] for i in missing]
        scorer = make_scorer()
        tox[missing] = scorer.score(texts, progress=True)[primary_label(scorer)]
        for i in missing:
            origin[i] = "scorer"
    return tox, origin


@keeps_old_version()
def run_attribute_stage(cfg: PipelineConfig, ver: StageVersion, decode_ver: StageVersion, train_ver: StageVersion,
                        cache_ver: StageVersion, *, force: bool = False) -> dict[str, Any]:
    """Score every head by every method, write Parquet + one DuckDB transaction; return a summary."""
    adir = ver.artifact
    db = warehouse_path(cfg.home)
    a = cfg.attribute
    manifest = None if force else adir.manifest()
    if manifest is not None:
        return reuse_complete(ver, manifest)
    decode_manifest = require_complete(decode_ver)
    cache_manifest = require_complete(cache_ver)
    ensure_fits(cfg, STAGE)  # before anything is written: a run that cannot fit says so now
    if force:
        reset_for_force(ver)  # only once the inputs are there; the old version is kept aside until done
    adir.prepare()
    register(ver, status="running")
    t0 = time.perf_counter()
    layers = cached_layers(cache_manifest)

    # Token toxicity: scored by the decode stage (its readouts need it); the lexicon and threshold apply here.
    in_lexicon, toxic_tokens = token_flags(cfg, decode_ver)
    t_vocab = time.perf_counter() - t0

    # Prompt groups for the contrasts.
    prompts = read_prompts(cache_ver.artifact).to_pydict()
    p_tox, origin = prompt_groups(prompts, lambda: get_scorer(a.scorer, **a.scorer_options))
    p_idx = np.asarray(prompts["prompt_idx"])
    toxic_prompt = p_tox >= a.prompt_threshold
    n_toxic, n_clean = int(toxic_prompt.sum()), int((~toxic_prompt).sum())
    if n_toxic == 0 or n_clean == 0:
        raise ConfigError(f"config error: attribute.prompt_threshold: the contrast needs toxic and non-toxic "
                          f"prompts; got {n_toxic} toxic, {n_clean} non-toxic at {a.prompt_threshold}")

    # Every score from what decode's single pass stored, aggregated in SQL (no Python loop over rows).
    shards = decode_shards(decode_ver.artifact)
    decodings = [decode_ver.artifact.path / files[0].path for files in shards.values()]
    readouts = [decode_ver.artifact.path / files[1].path for files in shards.values()]
    n_heads = decode_manifest["summary"]["heads"] // decode_manifest["summary"]["layers"]
    spill = adir.path / f"{TMP_PREFIX}spill"  # DuckDB's spill folder, if a query outgrows its memory limit
    sums = group_sums(readouts, pa.table({"prompt_idx": pa.array(p_idx, pa.int32()), "toxic": toxic_prompt}),
                      spill_dir=spill)
    scores, positions = _lens_scores(sums, layers, n_heads)
    toxic_ids = p_idx[toxic_prompt]
    hits = _per_head(dictionary_hits(decodings, toxic_ids, toxic_tokens, spill_dir=spill), "hits", layers, n_heads)
    scores["dictionary_count"] = hits / max(positions[True], 1)
    top_tokens: dict[str, dict[tuple[int, int], list[str]]] = {"trained": {}, "logit": {}}  # lens -> head -> tokens
    for row in top_tokens_of(decodings, toxic_ids, 5, spill_dir=spill).to_pylist():
        top_tokens[row["lens"]].setdefault((row["layer"], row["head"]), []).append(row["token"])
    shutil.rmtree(spill, ignore_errors=True)
    ranks = {m: A.ranks(s) for m, s in scores.items()}
    spearman = {f"{m1}~{m2}": _finite_or_none(A.spearman(scores[m1], scores[m2]))
                for i, m1 in enumerate(A.METHODS) for m2 in A.METHODS[i + 1:]}
    t_total = time.perf_counter() - t0

    # Files first (each atomic), then one warehouse transaction.
    out = adir.path
    files = [
        write_parquet_file(out, PROMPT_GROUPS_FILE,
                           prompt_groups_table(ver.version, p_idx, p_tox, origin, toxic_prompt)),
        write_parquet_file(out, HEAD_SCORES_FILE, head_scores_table(ver.version, layers, scores, ranks)),
        write_parquet_file(out, TOKEN_FLAGS_FILE, token_flags_table(in_lexicon, toxic_tokens)),
    ]
    top = {m: _top_heads(scores[m], ranks[m], layers, a.top_heads, top_tokens) for m in A.METHODS}
    for m in A.METHODS:
        score_heatmap(scores[m], layers, m, out / heatmap_name(m))
    vocab_summary = decode_manifest["summary"]["token_toxicity"]
    report = top_heads_markdown(top, spearman, vocab_summary["scorer"])
    atomic_write_bytes(out / TOP_HEADS_REPORT, report.encode())
    summary = {
        "rows": len(A.METHODS) * scores["lens_contrast"].size, "heads": int(scores["lens_contrast"].size),
        "methods": list(A.METHODS), "scorer": vocab_summary["scorer"],
        "label": vocab_summary["label"], "toxic_tokens": int(toxic_tokens.sum()),
        "scored_pieces": vocab_summary["scored_pieces"],
        "toxic_prompts": n_toxic, "non_toxic_prompts": n_clean,
        "positions": decode_manifest["summary"]["which_positions"],
        "spearman": spearman, "top_heads": top, "report": str(out / TOP_HEADS_REPORT),
        "heatmaps": {m: str(out / heatmap_name(m)) for m in A.METHODS},
        "seconds_vocab": t_vocab, "seconds": t_total,
    }
    atomic_write_bytes(out / ATTRIBUTION_SUMMARY, json.dumps(summary, indent=1, default=float).encode())
    adir.record_shard(0, files)
    store_rows(db, ver)
    manifest = adir.finalize(config=ver.config, inputs=ver.inputs, summary=summary)
    register_complete(ver, manifest)
    return {"version": ver.version, "path": str(out), "cached": False, **summary}


def _per_head(table: pa.Table, column: str, layers: list[int], n_heads: int) -> np.ndarray:
    """Scatter a (layer, head, column) table into an `[L, H]` array (heads without a row stay 0)."""
    out = np.zeros((len(layers), n_heads))
    index = {layer: i for i, layer in enumerate(layers)}
    li = np.array([index[x] for x in table.column("layer").to_pylist()], dtype=np.int64)
    out[li, np.asarray(table.column("head"), dtype=np.int64)] = np.asarray(table.column(column), dtype=np.float64)
    return out


def _lens_scores(sums: pa.Table, layers: list[int], n_heads: int) -> tuple[dict[str, np.ndarray], dict[bool, int]]:
    """Return the methods computed from the full per-head distributions, `[L, H]` each, from the group sums,
    and the number of positions in each prompt group (toxic: True)."""
    groups = {g: sums.filter(pc.field("toxic") == g) for g in (True, False)}
    n = {g: int(t.column("n")[0].as_py()) if t.num_rows else 0 for g, t in groups.items()}  # same for every head
    per = {(key, g): _per_head(t, key, layers, n_heads) for key in ("trained_tox", "logit_tox", "dla")
           for g, t in groups.items()}
    contrast = {k: A.contrast(per[(k, True)], n[True], per[(k, False)], n[False])
                for k in ("trained_tox", "logit_tox", "dla")}
    return {"lens_contrast": contrast["trained_tox"], "logit_lens_contrast": contrast["logit_tox"],
            "lens_mean": (per[("trained_tox", True)] + per[("trained_tox", False)]) / (n[True] + n[False]),
            "direct_logit": contrast["dla"]}, n


def _finite_or_none(x: float) -> float | None:
    # A constant method (e.g. no dictionary-toxic token in any top-k) has no ranking to correlate.
    return None if np.isnan(x) else x


def _top_heads(scores: np.ndarray, ranks: np.ndarray, layers: list[int], n: int,
               top_tokens: dict[str, dict[tuple[int, int], list[str]]]) -> list[dict[str, Any]]:
    """Return the report rows of the `n` best heads of `[L, H]` scores, best first, with their top tokens under the
    trained lens (`top_tokens`) and the logit lens (`top_tokens_logit`)."""
    index = {layer: i for i, layer in enumerate(layers)}
    return [{"rank": int(ranks[index[layer], head]), "layer": layer, "head": head,
             "score": float(scores[index[layer], head]), "top_tokens": top_tokens["trained"].get((layer, head), []),
             "top_tokens_logit": top_tokens["logit"].get((layer, head), [])}
            for layer, head in A.heads_best_first(scores, layers)[:n]]


def token_flags(cfg: PipelineConfig, decode_ver: StageVersion) -> tuple[np.ndarray, np.ndarray]:
    """Return (in the lexicon, toxic) `[V]` bool per token: decode's token toxicity >= `attribute.token_threshold`,
    or the token in `attribute.lexicon` (`dictionary_count`'s toxic tokens)."""
    a = cfg.attribute
    tokens = read_token_toxicity(decode_ver.artifact, ["token", "score"])
    lexicon = load_lexicon(a.lexicon) if a.lexicon else set()
    in_lex = np.array([scoring_key(t) in lexicon for t in tokens.column("token").to_pylist()], dtype=bool)
    return in_lex, (tokens.column("score").to_numpy() >= a.token_threshold) | in_lex


def store_rows(db: Path, ver: StageVersion) -> None:
    """Load the version's warehouse rows (vocabulary toxicity, prompt groups, head scores) from its folder, the
    vocabulary rows joined with its decode version's token toxicity (one transaction)."""
    out = ver.artifact.path
    flags = pq.read_table(out / TOKEN_FLAGS_FILE)
    tokens = read_token_toxicity(ArtifactDir(ver.home, "decode", ver.inputs["decode"]))
    vocab = vocab_table(ver.version, tokens, flags.column("in_lexicon").to_numpy(zero_copy_only=False),
                        flags.column("toxic").to_numpy(zero_copy_only=False))
    store_attribution(db, ver.version, vocab, pq.read_table(out / PROMPT_GROUPS_FILE),
                      pq.read_table(out / HEAD_SCORES_FILE))


@task(name="attribute", persist_result=True)  # keyed by its version in flows/common.run_stage_task
def attribute_task(cfg: PipelineConfig, ver: StageVersion, decode_ver: StageVersion, train_ver: StageVersion,
                   cache_ver: StageVersion, force: bool = False) -> dict[str, Any]:
    """Prefect task: the attribute stage, keyed by its artifact version."""
    with failures_recorded(ver):
        return run_attribute_stage(cfg, ver, decode_ver, train_ver, cache_ver, force=force)
