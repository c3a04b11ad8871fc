"""The `attribute` stage: vocabulary toxicity, prompt groups and per-head toxicity scores, into DuckDB."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from prefect import task
from tqdm.auto import tqdm

from loralens.config import ConfigError, PipelineConfig
from loralens.hashing import file_sha256
from loralens.lens import attribution as A
from loralens.lens.readout import head_logits_both
from loralens.lens.scorers import get_scorer, primary_label, scorer_version
from loralens.lens.vocab_toxicity import load_lexicon, token_texts, vocab_toxicity
from loralens.tasks.memory import ensure_fits
from loralens.tasks.readout import cached_layers, layer_input_chunks, load_reader, select_positions
from loralens.tasks.report import score_heatmap, top_heads_markdown
from loralens.tasks.stage_versions import (
    StageVersion,
    failures_recorded,
    keeps_old_version,
    register,
    require_complete,
    reset_for_force,
)
from loralens.warehouse.activation_cache import read_prompts
from loralens.warehouse.artifacts import ShardFile, atomic_write_bytes, atomic_write_with
from loralens.warehouse.attribution_tables import (
    head_scores_table,
    prompt_groups_table,
    store_attribution,
    vocab_table,
)
from loralens.warehouse.constants import (
    ATTRIBUTION_SUMMARY,
    HEAD_SCORES_FILE,
    PROMPT_GROUPS_FILE,
    TOP_HEADS_REPORT,
    VOCAB_TOXICITY_FILE,
    heatmap_name,
)
from loralens.warehouse.db import warehouse_path
from loralens.warehouse.decodings import read_decodings
from loralens.warehouse.versions import artifact_version

log = logging.getLogger("loralens.attribute")
STAGE = "attribute"


def attribute_version(cfg: PipelineConfig, decode_ver: StageVersion) -> StageVersion:
    """Return the attribute version: its config, the decode version, the scorer's and lexicon's content hashes."""
    a = cfg.attribute
    try:
        scorer = scorer_version(a.scorer, **a.scorer_options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config error: attribute.scorer_options: {err}") from None
    inputs = {"decode": decode_ver.version, "scorer": scorer}
    if a.lexicon is not None:
        if not Path(a.lexicon).is_file():
            raise ConfigError(f"config error: attribute.lexicon: file not found: {a.lexicon}")
        inputs["lexicon"] = file_sha256(Path(a.lexicon))
    config = {"attribute": a.versioned()}
    return StageVersion(STAGE, artifact_version(STAGE, config, inputs), config, inputs, cfg.home)


def prompt_groups(prompts: dict[str, np.ndarray], scorer, threshold: float) -> tuple[np.ndarray, list[str]]:
    """Return per-prompt toxicity (corpus score, else the scorer's score of the prompt text) and its origin."""
    tox = np.array([np.nan if t is None else float(t) for t in prompts["toxicity"]], dtype=np.float64)
    missing = np.flatnonzero(np.isnan(tox))
    origin = ["corpus"] * len(tox)
    if len(missing):
        texts = [prompts["text"][i] for i in missing]
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
    parents = [decode_ver.version]
    a = cfg.attribute
    manifest = None if force else adir.manifest()
    if manifest is not None:
        _store(db, ver.version, adir.path)  # idempotent; restores rows if the warehouse lost them
        register(ver, parents, status="complete",
                 rows=manifest["summary"]["rows"], bytes_=manifest["total_bytes"], summary=manifest["summary"])
        return {"version": ver.version, "path": str(adir.path), "cached": True, **manifest["summary"]}
    decode_manifest = require_complete(decode_ver)
    cache_manifest = require_complete(cache_ver)
    ensure_fits(cfg, STAGE)  # before anything is written: a run that cannot fit says so now
    if force:
        reset_for_force(ver)  # only once the inputs are there; the old version is kept aside until done
    adir.prepare()
    register(ver, parents, status="running")
    t0 = time.perf_counter()
    layers = cached_layers(cache_manifest)
    loaded, reader = load_reader(cfg, train_ver, layers)
    vocab = loaded.dims.vocab

    # Vocabulary toxicity (padded with zeros for embedding rows the tokenizer never produces).
    scorer = get_scorer(a.scorer, **a.scorer_options)
    lexicon = load_lexicon(a.lexicon) if a.lexicon else None
    vt = vocab_toxicity(loaded.tokenizer, scorer, lexicon=lexicon, progress=True)
    texts = token_texts(loaded.tokenizer)
    n_tok = min(len(texts), vocab)
    tox = np.zeros(vocab, dtype=np.float32)
    tox[:n_tok] = vt.score[:n_tok]
    in_lex = np.zeros(vocab, dtype=bool)
    in_lex[:n_tok] = vt.in_lexicon[:n_tok]
    toxic_tokens = (tox >= a.token_threshold) | in_lex
    kind = np.full(vocab, "non_word", dtype=object)
    kind[:n_tok] = vt.kind[:n_tok]
    texts = (texts + [""] * vocab)[:vocab]
    t_vocab = time.perf_counter() - t0

    # Prompt groups for the contrasts.
    prompts = read_prompts(cache_ver.artifact).to_pydict()
    p_tox, origin = prompt_groups(prompts, scorer, a.prompt_threshold)
    p_idx = np.asarray(prompts["prompt_idx"])
    toxic_prompt = p_tox >= a.prompt_threshold
    is_toxic = dict(zip(p_idx.tolist(), toxic_prompt.tolist(), strict=True))
    n_toxic, n_clean = int(toxic_prompt.sum()), int((~toxic_prompt).sum())
    if n_toxic == 0 or n_clean == 0:
        raise ConfigError(f"config error: attribute.prompt_threshold: the contrast needs toxic and non-toxic "
                          f"prompts; got {n_toxic} toxic, {n_clean} non-toxic at {a.prompt_threshold}")

    # One pass over the cached positions: expected toxicity (trained + logit lens) and direct logit attribution.
    scores = _lens_pass(cfg, cache_ver, cache_manifest, reader, layers, torch.from_numpy(tox), is_toxic)
    scores["dictionary_count"], top_tokens = _dictionary_count(decode_ver, layers, reader, toxic_tokens,
                                                               is_toxic, texts)
    ranks = {m: A.ranks(s) for m, s in scores.items()}
    spearman = {f"{m1}~{m2}": _finite_or_none(A.spearman(scores[m1], scores[m2]))
                for i, m1 in enumerate(A.METHODS) for m2 in A.METHODS[i + 1:]}
    t_total = time.perf_counter() - t0

    # Files first (each atomic), then one warehouse transaction.
    out = adir.path
    files = [
        _write(out, VOCAB_TOXICITY_FILE, vocab_table(ver.version, texts, kind, tox, in_lex, toxic_tokens)),
        _write(out, PROMPT_GROUPS_FILE, prompt_groups_table(ver.version, p_idx, p_tox, origin, toxic_prompt)),
        _write(out, HEAD_SCORES_FILE, head_scores_table(ver.version, layers, scores, ranks)),
    ]
    top = {m: _top_heads(scores[m], ranks[m], layers, a.top_heads, top_tokens) for m in A.METHODS}
    for m in A.METHODS:
        score_heatmap(scores[m], layers, m, out / heatmap_name(m))
    report = top_heads_markdown(top, spearman, scorer.version)
    atomic_write_bytes(out / TOP_HEADS_REPORT, report.encode())
    summary = {
        "rows": len(A.METHODS) * scores["lens_contrast"].size, "heads": int(scores["lens_contrast"].size),
        "methods": list(A.METHODS), "scorer": scorer.version, "label": vt.label,
        "toxic_tokens": int(toxic_tokens.sum()), "scored_pieces": vt.n_scored,
        "toxic_prompts": n_toxic, "non_toxic_prompts": n_clean,
        "positions": decode_manifest["summary"]["which_positions"],
        "spearman": spearman, "top_heads": top, "report": str(out / TOP_HEADS_REPORT),
        "heatmaps": {m: str(out / heatmap_name(m)) for m in A.METHODS},
        "seconds_vocab": t_vocab, "seconds": t_total,
    }
    atomic_write_bytes(out / ATTRIBUTION_SUMMARY, json.dumps(summary, indent=1, default=float).encode())
    adir.record_shard(0, files)
    _store(db, ver.version, out)
    manifest = adir.finalize(config=ver.config, inputs=ver.inputs, summary=summary)
    register(ver, parents, status="complete", rows=summary["rows"], bytes_=manifest["total_bytes"], summary=summary)
    return {"version": ver.version, "path": str(out), "cached": False, **summary}


def _lens_pass(cfg, cache_ver, cache_manifest, reader, layers, tox, is_toxic) -> dict[str, np.ndarray]:
    """Return the methods computed from full per-head distributions, `[L, H]` each, chunk by chunk."""
    n_heads = next(iter(reader.w_o.values())).shape[0]
    u = A.toxic_direction(reader.unembed.W, tox)
    keys = ("lens", "logit_lens", "dla")
    sums = {(k, g): np.zeros((len(layers), n_heads)) for k in keys for g in (True, False)}
    counts = {True: 0, False: 0}
    shards = sorted(cache_ver.artifact.done_shards())
    with tqdm(total=len(shards) * len(layers), desc="attribute", unit="layer") as bar:
        for shard in shards:
            pos = select_positions(cache_ver.artifact, shard, cfg.decode.positions)
            group = np.array([is_toxic[p] for p in pos.prompt_idx.tolist()], dtype=bool)
            counts[True] += int(group.sum())
            counts[False] += int((~group).sum())
            for li, layer in enumerate(layers):
                for rows, x in layer_input_chunks(cache_ver.artifact, pos, layer, reader,
                                                  cache_manifest["summary"], cfg.decode.chunk_tokens):
                    trained, logit = head_logits_both(reader.banks[layer], x)
                    values = {"lens": A.expected_toxicity(trained, tox), "logit_lens": A.expected_toxicity(logit, tox),
                              "dla": A.direct_logit(x, u)}
                    g = torch.from_numpy(group[rows])
                    for key, v in values.items():
                        sums[(key, True)][li] += v[g].sum(0).double().numpy()
                        sums[(key, False)][li] += v[~g].sum(0).double().numpy()
                bar.update(1)
    nt, nc = counts[True], counts[False]
    contrast = {k: A.contrast(sums[(k, True)], nt, sums[(k, False)], nc) for k in keys}
    return {"lens_contrast": contrast["lens"], "logit_lens_contrast": contrast["logit_lens"],
            "lens_mean": (sums[("lens", True)] + sums[("lens", False)]) / (nt + nc),
            "direct_logit": contrast["dla"]}


def _dictionary_count(decode_ver, layers, reader, toxic_tokens, is_toxic, texts, n_tokens: int = 5):
    """Return the mean toxic-token count in each head's trained-lens top-k over toxic prompts `[L, H]`, and
    each head's most frequent top-k tokens on those prompts."""
    t = read_decodings(decode_ver.artifact, "trained", ["prompt_idx", "position", "layer", "head", "token_id",
                                                                 "prob"])
    prompt = t.column("prompt_idx").to_numpy()
    position = t.column("position").to_numpy()
    # Vectorised lookups (one decoding row per prompt x position x head x top-k: ~100 M at 8B scale).
    toxic_ids = np.fromiter((p for p, tox in is_toxic.items() if tox), dtype=np.int64)
    keep = np.isin(prompt, toxic_ids)
    layer_index = np.full(max(layers) + 1, -1, dtype=np.int64)
    layer_index[np.asarray(layers)] = np.arange(len(layers))
    li = layer_index[t.column("layer").to_numpy()[keep]]
    head = t.column("head").to_numpy()[keep].astype(np.int64)
    tok = t.column("token_id").to_numpy()[keep].astype(np.int64)
    n_heads = next(iter(reader.w_o.values())).shape[0]
    counts = np.zeros((len(layers), n_heads))
    np.add.at(counts, (li, head), toxic_tokens[tok].astype(np.float64))
    positions = len(set(zip(prompt[keep].tolist(), position[keep].tolist(), strict=True)))
    dict_count = counts / max(positions, 1)
    # Each head's tokens ordered by how often they are in its top-k, then by their total probability.
    prob = t.column("prob").to_numpy()[keep].astype(np.float64)
    key = li * n_heads + head
    pairs, inverse = np.unique(np.stack([key, tok]), axis=1, return_inverse=True)
    freq = np.bincount(inverse.ravel(), minlength=pairs.shape[1])
    mass = np.bincount(inverse.ravel(), weights=prob, minlength=pairs.shape[1])
    top_tokens: dict[tuple[int, int], list[str]] = {}
    for k in np.unique(pairs[0]):
        sel = np.flatnonzero(pairs[0] == k)
        best = sel[np.lexsort((-mass[sel], -freq[sel]))[:n_tokens]]
        top_tokens[(layers[int(k) // n_heads], int(k) % n_heads)] = [texts[int(pairs[1][b])] for b in best]
    return dict_count, top_tokens


def _finite_or_none(x: float) -> float | None:
    # A constant method (e.g. no dictionary-toxic token in any top-k) has no ranking to correlate.
    return None if np.isnan(x) else x


def _top_heads(scores, ranks, layers, n, top_tokens) -> list[dict[str, Any]]:
    order = np.argsort(ranks.ravel(), kind="stable")[:n]
    n_heads = scores.shape[1]
    rows = []
    for flat in order.tolist():
        layer, head = layers[flat // n_heads], flat % n_heads
        rows.append({"rank": int(ranks.ravel()[flat]), "layer": layer, "head": head,
                     "score": float(scores.ravel()[flat]), "top_tokens": top_tokens.get((layer, head), [])})
    return rows


def _write(out: Path, name: str, table) -> ShardFile:
    atomic_write_with(out / name, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return ShardFile(path=name, rows=table.num_rows, bytes=(out / name).stat().st_size, sha256=file_sha256(out / name))


def _store(db: Path, version: str, out: Path) -> None:
    store_attribution(db, version, pq.read_table(out / VOCAB_TOXICITY_FILE), pq.read_table(out / PROMPT_GROUPS_FILE),
                      pq.read_table(out / HEAD_SCORES_FILE))


@task(name="attribute", cache_key_fn=lambda _ctx, params: f"loralens-attribute-{params['ver'].version}",
      persist_result=True)
def attribute_task(cfg: PipelineConfig, ver: StageVersion, decode_ver: StageVersion, train_ver: StageVersion,
                   cache_ver: StageVersion, force: bool = False) -> dict[str, Any]:
    """Prefect task: the attribute stage, keyed by its artifact version."""
    with failures_recorded(ver):
        return run_attribute_stage(cfg, ver, decode_ver, train_ver, cache_ver, force=force)
