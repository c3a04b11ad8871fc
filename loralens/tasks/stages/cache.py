"""The `cache` stage: fix its version, run the frozen model over the corpus, write resumable shards."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from loralens.config import ConfigError, PipelineConfig
from loralens.lens.heads.capture import (
    TokenArrays,
    TokenizedPrompts,
    cache_batch,
    effective_max_length,
    text_windows,
    tokenize_prompts,
)
from loralens.lens.runtime.models import folder_fingerprint, resolve_model_path
from loralens.tasks.memory import ensure_fits
from loralens.tasks.stage_versions import (
    StageVersion,
    failures_recorded,
    keeps_old_version,
    register,
    register_complete,
    reset_for_force,
    reuse_complete,
    reverify_on_reuse,
    science_config,
)
from loralens.tasks.workers.worker_process import stage_model
from loralens.warehouse.activation_cache import read_prompts, shard_relpaths, write_cache_shard
from loralens.warehouse.attribution_tables import register_prompts
from loralens.warehouse.corpus import Corpus, load_corpus, load_training_text
from loralens.warehouse.db import warehouse_path, writes_forbidden
from loralens.warehouse.versions import artifact_version

log = logging.getLogger("loralens.cache")
STAGE = "cache"


def cache_version(cfg: PipelineConfig) -> StageVersion:
    """Return the cache stage's version: a hash of its science settings, the model's and the corpus's content."""
    model_path = resolve_model_path(cfg.model.name, cfg.home, cfg.model.revision)
    model_fp = folder_fingerprint(Path(model_path)) if Path(model_path).is_dir() else str(model_path)
    corpus = load_corpus(cfg.corpus.paths, cfg.corpus.max_prompts_per_file)
    config = science_config(cfg, STAGE)  # with the top-k actually stored (None resolves by train.loss)
    inputs = {"model": model_fp, "corpus": corpus.fingerprint()}
    if cfg.corpus.text_paths:
        inputs["text"] = load_training_text(cfg.corpus.text_paths, cfg.corpus.text_start).fingerprint()
    return StageVersion(STAGE, artifact_version(STAGE, config, inputs), config, inputs, cfg.home)


def _shard_prompts(corpus: Corpus, token_ids: list[list[int]], per_shard: int) -> list[list[int]]:
    """Return corpus indices per shard (prompts with no tokens are left out)."""
    kept = [i for i in range(len(corpus.prompts)) if token_ids[i]]
    return [kept[i : i + per_shard] for i in range(0, len(kept), per_shard)]


@dataclass
class CacheInputs:
    """What the cache stage runs the model on: the prompts, then the lens-training text windows.

    `ids` holds the prompts' tokens, then the windows' (window j is row `n_prompts + j`: its `prompt_idx`, so the
    held-out rule `prompt_idx % n` splits windows like prompts); `shards` lists rows per shard, the prompt shards
    first (`n_prompt_shards` of them: the only ones decode reads), then the text shards.
    """

    corpus: Corpus
    tok: TokenizedPrompts
    ids: list[list[int]]
    shards: list[list[int]]
    n_prompt_shards: int
    text_per_source: dict[str, int]  # characters read per text file

    @property
    def n_text_windows(self) -> int:
        """Return how many text windows are cached."""
        return len(self.ids) - len(self.corpus.prompts)

    @property
    def n_tokens(self) -> int:
        """Return how many tokens the shards hold (prompts with no tokens are in none)."""
        return sum(len(self.ids[i]) for s in self.shards for i in s)


def cache_inputs(cfg: PipelineConfig, tokenizer, max_len: int) -> CacheInputs:
    """Return the tokenized prompts and text windows of the config, in shards."""
    corpus = load_corpus(cfg.corpus.paths, cfg.corpus.max_prompts_per_file)
    tok = tokenize_prompts(tokenizer, [p.text for p in corpus.prompts], max_len)
    shards = _shard_prompts(corpus, tok.ids, cfg.cache.prompts_per_shard)
    windows: list[list[int]] = []
    per_source: dict[str, int] = {}
    if cfg.corpus.text_paths:
        text = load_training_text(cfg.corpus.text_paths, cfg.corpus.text_start)
        windows, per_source = text_windows(tokenizer, text.text, max_len, cfg.corpus.text_tokens), text.per_source
    rows = list(range(len(tok.ids), len(tok.ids) + len(windows)))
    per = cfg.cache.prompts_per_shard
    text_shards = [rows[i : i + per] for i in range(0, len(rows), per)]
    return CacheInputs(corpus, tok, tok.ids + windows, shards + text_shards, len(shards), per_source)


def store_rows(db: Path, ver: StageVersion) -> None:
    """Load the version's warehouse rows (its prompts) from its folder."""
    register_prompts(db, ver.version, read_prompts(ver.artifact))


def registered_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return the summary a complete version registers: the manifest's, with the bytes per cached token (known
    only once the manifest is written)."""
    return {**manifest["summary"],
            "bytes_per_token": manifest["total_bytes"] / max(manifest["summary"]["n_tokens"], 1)}


@keeps_old_version(worker_arg="only_shards")
def run_cache_stage(cfg: PipelineConfig, ver: StageVersion, *, force: bool = False,
                    only_shards: list[int] | None = None) -> dict[str, Any]:
    """Cache every shard not yet done (resuming a killed run), then write the manifest; return a summary.

    `only_shards`: worker mode for a run split over several processes or machines sharing the artifact
    folder: cache just these shards (never touching the others' temp files) and write the manifest only if
    every shard is then done; a final run without `only_shards` finalizes otherwise.
    """
    adir = ver.artifact
    if force and only_shards is None:
        reset_for_force(ver)
    db = warehouse_path(cfg.home)
    reverify_on_reuse(ver)
    manifest = adir.manifest()
    worker = only_shards is not None  # one share of a split run: Parquet only, the finalizing run registers
    if manifest is not None:
        return reuse_complete(ver, manifest, worker=worker)
    ensure_fits(cfg, STAGE)  # before anything is written: a run that cannot fit says so now
    adir.prepare(clean_tmp=not worker)
    if not worker:
        register(ver, status="running")

    t_start = time.perf_counter()
    loaded = stage_model(cfg)  # a Dask worker process loads it once for all the shards it caches
    layers = list(cfg.cache.layers) if cfg.cache.layers is not None else list(range(loaded.dims.n_layers))
    bad = [layer for layer in layers if not 0 <= layer < loaded.dims.n_layers]
    if bad:
        raise ConfigError(f"config error: cache.layers: {bad} out of range for {loaded.dims.n_layers} layers")
    max_len = effective_max_length(loaded, cfg.cache.max_length)
    inputs = cache_inputs(cfg, loaded.tokenizer, max_len)
    corpus, tok, shards = inputs.corpus, inputs.tok, inputs.shards
    if tok.n_truncated:
        log.warning("%d of %d prompts longer than %d tokens were truncated", tok.n_truncated, len(corpus.prompts),
                    max_len)
    total_tokens = inputs.n_tokens
    redone = 0
    t_loop = time.perf_counter()

    # One writer thread overlaps Parquet encoding of shard i with the forward passes of shard i+1.
    with ThreadPoolExecutor(max_workers=1) as writer, tqdm(total=total_tokens, desc="cache", unit="tok") as bar:
        pending: Future | None = None
        for s, idxs in enumerate(shards):
            n_tokens = sum(len(inputs.ids[i]) for i in idxs)
            if (only_shards is not None and s not in only_shards) or adir.shard_files(s) is not None:
                bar.update(n_tokens)
                continue
            rels = shard_relpaths(s, layers)
            if any((adir.path / r).exists() for r in rels):
                redone += 1  # a killed write or a checksum mismatch: the shard is redone from scratch
            adir.discard_shard(s, rels)
            arrays = _cache_shard(loaded, inputs.ids, idxs, layers, cfg, bar)
            prompts = [_prompt_row(corpus, tok, i) for i in idxs if i < len(corpus.prompts)]  # none in a text shard
            cols = {k: v for k, v in arrays.__dict__.items() if k != "z"}
            if pending is not None:
                pending.result()
            pending = writer.submit(write_cache_shard, adir, s, cols, arrays.z, prompts)
        if pending is not None:
            pending.result()
    t_end = time.perf_counter()
    if worker and (len(adir.done_shards()) < len(shards) or writes_forbidden()):
        return {"version": ver.version, "path": str(adir.path), "cached": False, "partial": True,
                "shards": sorted(only_shards), "shards_done": len(adir.done_shards()), "n_shards": len(shards)}

    summary = {
        "model": loaded.path,
        "n_prompts": sum(len(s) for s in shards[: inputs.n_prompt_shards]),
        "n_tokens": total_tokens,
        "n_prompt_shards": inputs.n_prompt_shards,  # the shards after these hold lens-training text only
        "text_windows": inputs.n_text_windows,
        "text_tokens": sum(len(inputs.ids[i]) for s in shards[inputs.n_prompt_shards:] for i in s),
        "n_layers": len(layers),
        "n_heads": loaded.dims.n_heads,
        "d_head": loaded.dims.d_head,
        "d_model": loaded.dims.d_model,
        "vocab": loaded.dims.vocab,
        "store_dtype": cfg.cache.store_dtype,
        "max_length": max_len,
        "truncated_prompts": tok.n_truncated,
        "empty_prompts": tok.n_empty,
        "blank_prompts_skipped": corpus.skipped_blank,
        "shards_redone": redone,
        "per_source": corpus.per_source,
        "text_per_source": inputs.text_per_source,
        "seconds_setup": t_loop - t_start,  # model load, corpus read, tokenization
        "seconds_loop": t_end - t_loop,  # forward passes and shard writes
    }
    manifest = adir.finalize(config=ver.config, inputs=ver.inputs, summary=summary)
    summary["bytes_per_token"] = manifest["total_bytes"] / max(total_tokens, 1)
    store_rows(db, ver)
    register_complete(ver, manifest)
    return {"version": ver.version, "path": str(adir.path), "cached": False, **summary}


def _cache_shard(loaded, token_ids, idxs, layers, cfg: PipelineConfig, bar) -> TokenArrays:
    # Longest first within a shard: less padding per batch, and a deterministic row order.
    order = sorted(idxs, key=lambda i: (-len(token_ids[i]), i))
    parts = []
    for b in range(0, len(order), cfg.cache.batch_size):
        batch = order[b : b + cfg.cache.batch_size]
        parts.append(cache_batch(loaded, [token_ids[i] for i in batch], batch, layers,
                                 top_k=cfg.target_top_k, store_dtype=cfg.cache.store_dtype))
        bar.update(parts[-1].n)
    return TokenArrays.concat(parts)


def _prompt_row(corpus: Corpus, tok: TokenizedPrompts, i: int) -> dict[str, Any]:
    p = corpus.prompts[i]
    return {"prompt_idx": i, "prompt_id": p.id, "source": p.source, "text": p.text, "toxicity": p.toxicity,
            "n_tokens": len(tok.ids[i]), "truncated": tok.truncated[i]}


def planned_inputs(cfg: PipelineConfig) -> CacheInputs:
    """Return the inputs the cache stage will cache, in its shards (tokenizes the corpus; loads no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    from loralens.lens.runtime.models import model_context_length, prepare_tokenizer

    path = resolve_model_path(cfg.model.name, cfg.home, cfg.model.revision)
    trust = cfg.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    prepare_tokenizer(tokenizer)
    context = model_context_length(AutoConfig.from_pretrained(path, trust_remote_code=trust))
    return cache_inputs(cfg, tokenizer, min(cfg.cache.max_length, context))


def shard_count(cfg: PipelineConfig) -> int:
    """Return how many shards the cache stage will write (`planned_inputs`)."""
    return len(planned_inputs(cfg).shards)


@task(name="cache-shards", cache_policy=NO_CACHE, persist_result=False)
def cache_shards_task(cfg: PipelineConfig, ver: StageVersion, shards: list[int]) -> dict[str, Any]:
    """Prefect task: cache only `shards` of the version (one worker's share of a split run; never cached)."""
    return run_cache_stage(cfg, ver, only_shards=shards)


@task(name="cache", persist_result=True)  # keyed by flows.common.run_stage_task (version + home)
def cache_task(cfg: PipelineConfig, ver: StageVersion, force: bool = False) -> dict[str, Any]:
    """Prefect task: the cache stage, keyed by its artifact version."""
    with failures_recorded(ver):
        return run_cache_stage(cfg, ver, force=force)
