"""The `decode` stage: one pass over every head's lens logits, to Parquet + DuckDB.

Each `[chunk, heads, vocab]` block is built once and yields everything decode and attribute need: the top-k
tokens under the trained and the logit lens (`decodings`, also loaded into DuckDB), and per position and head
the expected token toxicity under both lenses and the direct logit attribution (`readouts`, Parquet only).
The expected toxicity needs every token's toxicity, so the vocabulary is scored here (`token_toxicity.parquet`)
with the attribute stage's scorer: the scorer's version is an input of the decode version. That file is the
pipeline's one vocabulary toxicity: attribute, select and intervene read it (`warehouse.decodings`).

A split run (`workers > 1`, `run.dask_address`) scores the vocabulary once in the flow process (`score_vocabulary`),
then maps the cache shards over Dask worker processes (`decode_shards_task`: Parquet and shard records only, the
token toxicity read back from the artifact folder); the ordinary `decode_task` then finds every shard done, loads
them into DuckDB and writes the manifest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from loralens.config import ConfigError, PipelineConfig
from loralens.lens.evaluation.scorers import get_scorer, scorer_version
from loralens.lens.evaluation.vocab_toxicity import token_texts, vocab_toxicity
from loralens.lens.heads.head_scores import toxic_direction
from loralens.lens.lenses.readout import HeadReader, HeadReadout, read_heads
from loralens.lens.runtime.models import load_tokenizer, resolve_model_path
from loralens.tasks.lens_loading import cached_layers, layer_input_chunks, select_positions
from loralens.tasks.memory import ensure_fits, model_facts
from loralens.tasks.stage_versions import (
    StageVersion,
    failures_recorded,
    keeps_old_version,
    register,
    register_complete,
    require_complete,
    reset_for_force,
    reuse_complete,
    reverify_on_reuse,
    science_config,
)
from loralens.tasks.workers.worker_process import stage_reader
from loralens.warehouse.activation_cache import prompt_shards
from loralens.warehouse.artifacts import ArtifactDir, ArtifactError
from loralens.warehouse.db import warehouse_path
from loralens.warehouse.decodings import (
    VOCAB_RECORD,
    decode_shards,
    decodings_block,
    load_shard_into_db,
    read_token_toxicity,
    readouts_block,
    token_toxicity_facts,
    token_toxicity_table,
    write_decode_shard,
    write_token_toxicity,
)
from loralens.warehouse.versions import artifact_version

STAGE = "decode"


def decode_version(cfg: PipelineConfig, train_ver: StageVersion) -> StageVersion:
    """Return the decode version: a hash of its science settings, the train version and the token scorer."""
    config = science_config(cfg, STAGE)
    inputs = {"train": train_ver.version, "scorer": token_scorer_version(cfg)}
    return StageVersion(STAGE, artifact_version(STAGE, config, inputs), config, inputs, cfg.home)


def token_scorer_version(cfg: PipelineConfig) -> str:
    """Return the version of the scorer that gives every vocabulary token its toxicity (attribute.scorer)."""
    try:
        return scorer_version(cfg.attribute.scorer, **cfg.attribute.scorer_options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config error: attribute.scorer_options: {err}") from None


def store_rows(db: Path, ver: StageVersion) -> int:
    """Bulk-load every finished shard of the version that the warehouse lacks (one transaction each) from its
    folder; return the shards loaded."""
    loaded = 0
    for index, files in sorted(decode_shards(ver.artifact).items()):
        loaded += load_shard_into_db(db, ver.version, index, ver.artifact.path / files[0].path, files[0].rows)
    return loaded


@keeps_old_version(worker_arg="only_units")
def run_decode_stage(cfg: PipelineConfig, ver: StageVersion, train_ver: StageVersion, cache_ver: StageVersion, *,
                     force: bool = False, only_units: list[int] | None = None) -> dict[str, Any]:
    """Decode every cache shard not yet done (resuming a killed run), load it into DuckDB; return a summary.

    `only_units` (cache shard indices): one worker's share of a split run: decode just those shards to Parquet
    and their shard records, reading the token toxicity that `score_vocabulary` wrote before the split (never
    scoring it), and return without touching DuckDB or the manifest; the finalizing run without `only_units`
    loads every shard and writes the manifest.
    """
    adir = ver.artifact
    db = warehouse_path(cfg.home)
    worker = only_units is not None  # one share of a split run: Parquet only, the finalizing run registers
    forced = force and not worker
    if not forced and not worker:
        reverify_on_reuse(ver)
    manifest = None if forced else adir.manifest()
    if manifest is not None:
        # A kill between the manifest and the last insert leaves rows to load: the restore loads them.
        return reuse_complete(ver, manifest, worker=worker)
    require_complete(train_ver)
    cache_manifest = require_complete(cache_ver)
    ensure_fits(cfg, STAGE)  # before anything is written: a run that cannot fit says so now
    if forced:
        reset_for_force(ver)  # only once the inputs are there; the old version is kept aside until done
    adir.prepare(clean_tmp=not worker)  # workers share the folder with others still writing
    if not worker:
        register(ver, status="running")
    t0 = time.perf_counter()
    layers = cached_layers(cache_manifest)
    shards = sorted(cache_shard_indices(cache_ver))
    if worker:
        if adir.shard_files(VOCAB_RECORD) is None:
            raise ArtifactError(f"decode {ver.version}: no token toxicity file in {adir.path}; the flow process "
                                "scores the vocabulary (score_vocabulary) before it maps the shards")
        shards = [s for s in shards if s in set(only_units)]
    todo = [s for s in shards if adir.shard_files(s) is None]
    # The lenses first: a bad lens bank fails before the vocabulary is scored. A Dask worker process loads them
    # once for all its shards; a finalizing run whose shards the workers decoded loads none.
    reader = stage_reader(cfg, train_ver, layers) if todo else None
    if not worker:
        _score_vocabulary(cfg, adir)
    if reader is not None:
        _decode_shards(cfg, ver, cache_ver, cache_manifest, layers, todo, reader[1], None if worker else db)
    if worker:
        left = sum(adir.shard_files(s) is None for s in cache_shard_indices(cache_ver))
        return {"version": ver.version, "path": str(adir.path), "cached": False, "partial": True,
                "shards": sorted(only_units), "shards_left": left}
    store_rows(db, ver)  # the shards Dask workers decoded (they never write DuckDB)
    done = decode_shards(adir)
    rows = sum(files[0].rows for files in done.values())
    k, n_heads = cfg.decode.top_k, cache_manifest["summary"]["n_heads"]
    positions = rows // (2 * k * n_heads * len(layers))
    summary = {"rows": rows, "positions": positions, "layers": len(layers), "heads": len(layers) * n_heads,
               "top_k": k, "which_positions": cfg.decode.positions, "token_toxicity": token_toxicity_facts(adir),
               "seconds": time.perf_counter() - t0}
    manifest = adir.finalize(config=ver.config, inputs=ver.inputs, summary=summary)
    register_complete(ver, manifest)
    return {"version": ver.version, "path": str(adir.path), "cached": False, **summary}


def _decode_shards(cfg: PipelineConfig, ver: StageVersion, cache_ver: StageVersion, cache_manifest: dict[str, Any],
                   layers: list[int], shards: list[int], reader: HeadReader, db: Path | None) -> None:
    """Decode `shards` to Parquet and their records; with `db` (not a worker) load each into DuckDB too."""
    adir = ver.artifact
    tox, texts = _vocab_tox_and_texts(adir)
    tox = tox.to(reader.device)
    toxic_dir = toxic_direction(reader.unembed.W, tox)
    k, chunk = cfg.decode.top_k, cfg.decode.chunk_tokens
    with tqdm(total=len(shards) * len(layers), desc="decode", unit="layer") as bar:
        for shard in shards:
            pos = select_positions(cache_ver.artifact, shard, cfg.decode.positions)
            decodings, readouts = [], []
            for layer in layers:
                reads = [read_heads(reader.banks[layer], x, k, tox, toxic_dir)
                         for _rows, x in layer_input_chunks(cache_ver.artifact, pos, layer, reader,
                                                            cache_manifest["summary"], chunk)]
                decodings += [_decodings(shard, layer, lens, pos, reads, texts) for lens in ("trained", "logit")]
                readouts.append(readouts_block(shard, layer, pos.prompt_idx, pos.position,
                                               *(_cat(reads, f) for f in ("trained_tox", "logit_tox", "dla"))))
                bar.update(1)
            files = write_decode_shard(adir, shard, pa.concat_tables(decodings), pa.concat_tables(readouts))
            if db is not None:
                load_shard_into_db(db, ver.version, shard, adir.path / files[0].path, files[0].rows)


def score_vocabulary(cfg: PipelineConfig, ver: StageVersion) -> None:
    """Score every vocabulary token once for the version (`token_toxicity.parquet`), unless already recorded.

    A split run calls it in the flow process before it maps the shards: the workers read the file back.
    """
    ver.artifact.prepare()  # no worker writes yet: a killed run's temp files can go
    _score_vocabulary(cfg, ver.artifact)


def _score_vocabulary(cfg: PipelineConfig, adir: ArtifactDir) -> None:
    """Write every vocabulary id's toxicity and text, and the scoring facts, unless recorded (a resumed run
    reads the file back). The tokenizer and the vocabulary size are read from the model folder (no weights).

    Embedding rows the tokenizer cannot produce (a padded vocabulary) get toxicity 0 and empty text.
    """
    if adir.shard_files(VOCAB_RECORD) is not None:
        return
    m, a = cfg.model, cfg.attribute
    tokenizer = load_tokenizer(resolve_model_path(m.name, cfg.home, m.revision), m.trust_remote_code)
    vocab = model_facts(cfg).dims.vocab  # the unembedding's rows (config.vocab_size)
    vt = vocab_toxicity(tokenizer, get_scorer(a.scorer, **a.scorer_options), progress=True)
    texts = (token_texts(tokenizer) + [""] * vocab)[:vocab]
    n = min(len(vt.score), vocab)
    score, kind = np.zeros(vocab, dtype=np.float32), np.full(vocab, "non_word", dtype=object)
    score[:n], kind[:n] = vt.score[:n], vt.kind[:n]
    facts = {"scorer": vt.scorer_version, "label": vt.label, "scored_pieces": vt.n_scored}
    write_token_toxicity(adir, token_toxicity_table(texts, kind, score, facts))


def _vocab_tox_and_texts(adir: ArtifactDir) -> tuple[torch.Tensor, np.ndarray]:
    """Return every vocabulary id's toxicity `[V]` and its text, from the version's token toxicity file."""
    table = read_token_toxicity(adir, ["token", "score"])
    return (torch.from_numpy(table.column("score").to_numpy().astype(np.float32)),
            np.array(table.column("token").to_pylist(), dtype=object))


def _cat(reads: list[HeadReadout], field: str) -> np.ndarray:
    """Concatenate one `[n, H]` readout over a layer's chunks."""
    get = {"trained_tox": lambda r: r.trained.expected_toxicity, "logit_tox": lambda r: r.logit.expected_toxicity,
           "dla": lambda r: r.direct_logit}[field]
    return torch.cat([get(r) for r in reads]).cpu().numpy()


def _decodings(shard: int, layer: int, lens: str, pos, reads: list[HeadReadout], texts: np.ndarray) -> pa.Table:
    """Return one layer's decoding rows under one lens, from its chunks' readouts."""
    tops = [getattr(r, lens).top for r in reads]
    return decodings_block(shard, layer, lens, pos.prompt_idx, pos.position,
                           torch.cat([t.ids for t in tops]).cpu().numpy(),
                           torch.cat([t.logits for t in tops]).cpu().numpy(),
                           torch.cat([t.probs for t in tops]).cpu().numpy(), texts)


def cache_shard_indices(cache_ver: StageVersion) -> list[int]:
    """Return the cache version's prompt shards (the shards after them hold lens-training text: never decoded)."""
    return prompt_shards(cache_ver.artifact)


@task(name="decode-shards", cache_policy=NO_CACHE, persist_result=False)
def decode_shards_task(cfg: PipelineConfig, ver: StageVersion, train_ver: StageVersion, cache_ver: StageVersion,
                       units: list[int]) -> dict[str, Any]:
    """Prefect task: decode only the cache shards `units` (one worker's share of a split run; never cached)."""
    return run_decode_stage(cfg, ver, train_ver, cache_ver, only_units=units)


@task(name="decode", persist_result=True)  # keyed by its version in flows/common.run_stage_task
def decode_task(cfg: PipelineConfig, ver: StageVersion, train_ver: StageVersion, cache_ver: StageVersion,
                force: bool = False) -> dict[str, Any]:
    """Prefect task: the decode stage, keyed by its artifact version."""
    with failures_recorded(ver):
        return run_decode_stage(cfg, ver, train_ver, cache_ver, force=force)
