"""The `decode` stage: one pass over every head's lens logits, to Parquet + DuckDB.

Each `[chunk, heads, vocab]` block is built once and yields everything decode and attribute need: the top-k
tokens under the trained and the logit lens (`decodings`, also loaded into DuckDB), and per position and head
the expected token toxicity under both lenses and the direct logit attribution (`readouts`, Parquet only).
The expected toxicity needs every token's toxicity, so the vocabulary is scored here (`token_toxicity.parquet`)
with the attribute stage's scorer: the scorer's version is an input of the decode version.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task
from tqdm.auto import tqdm

from loralens.config import ConfigError, PipelineConfig
from loralens.lens.attribution import toxic_direction
from loralens.lens.readout import HeadReadout, read_heads
from loralens.lens.scorers import get_scorer, scorer_version
from loralens.lens.vocab_toxicity import token_texts, vocab_toxicity
from loralens.tasks.memory import ensure_fits
from loralens.tasks.readout import cached_layers, layer_input_chunks, load_reader, select_positions
from loralens.tasks.stage_versions import (
    StageVersion,
    failures_recorded,
    keeps_old_version,
    register,
    require_complete,
    reset_for_force,
    reverify_on_reuse,
)
from loralens.warehouse.constants import TOKEN_TOXICITY_FILE
from loralens.warehouse.db import warehouse_path
from loralens.warehouse.decodings import (
    VOCAB_RECORD,
    decode_shards,
    decodings_block,
    load_shard_into_db,
    readouts_block,
    token_toxicity_table,
    write_decode_shard,
    write_token_toxicity,
)
from loralens.warehouse.versions import artifact_version

STAGE = "decode"


def decode_version(cfg: PipelineConfig, train_ver: StageVersion) -> StageVersion:
    """Return the decode stage's version: a hash of the decode config, the train version and the token scorer."""
    config = {"decode": cfg.decode.model_dump(exclude={"chunk_tokens"})}
    inputs = {"train": train_ver.version, "scorer": token_scorer_version(cfg)}
    return StageVersion(STAGE, artifact_version(STAGE, config, inputs), config, inputs, cfg.home)


def token_scorer_version(cfg: PipelineConfig) -> str:
    """Return the version of the scorer that gives every vocabulary token its toxicity (attribute.scorer)."""
    try:
        return scorer_version(cfg.attribute.scorer, **cfg.attribute.scorer_options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config error: attribute.scorer_options: {err}") from None


def load_into_warehouse(ver: StageVersion) -> int:
    """Bulk-load every finished shard that the warehouse lacks (one transaction each); return shards loaded."""
    db = warehouse_path(ver.home)
    loaded = 0
    for index, files in sorted(decode_shards(ver.artifact).items()):
        loaded += load_shard_into_db(db, ver.version, index, ver.artifact.path / files[0].path, files[0].rows)
    return loaded


@keeps_old_version()
def run_decode_stage(cfg: PipelineConfig, ver: StageVersion, train_ver: StageVersion, cache_ver: StageVersion, *,
                     force: bool = False) -> dict[str, Any]:
    """Decode every cache shard not yet done (resuming a killed run), load it into DuckDB; return a summary."""
    adir = ver.artifact
    db = warehouse_path(cfg.home)
    parents = [train_ver.version]
    if not force:
        reverify_on_reuse(ver)
    manifest = None if force else adir.manifest()
    if manifest is not None:
        load_into_warehouse(ver)  # a kill between the manifest and the last insert leaves rows to load
        register(ver, parents, status="complete",
                 rows=manifest["summary"]["rows"], bytes_=manifest["total_bytes"], summary=manifest["summary"])
        return {"version": ver.version, "path": str(adir.path), "cached": True, **manifest["summary"]}
    require_complete(train_ver)
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
    tox, texts, scoring = _token_toxicity(cfg, adir, loaded.tokenizer, vocab)
    tox = tox.to(reader.device)
    toxic_dir = toxic_direction(reader.unembed.W, tox)
    shards = sorted(cache_shard_indices(cache_ver))
    k, chunk = cfg.decode.top_k, cfg.decode.chunk_tokens
    with tqdm(total=len(shards) * len(layers), desc="decode", unit="layer") as bar:
        for shard in shards:
            if adir.shard_files(shard) is not None:
                bar.update(len(layers))
                continue
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
            load_shard_into_db(db, ver.version, shard, adir.path / files[0].path, files[0].rows)
    load_into_warehouse(ver)
    done = decode_shards(adir)
    rows = sum(files[0].rows for files in done.values())
    positions = rows // (2 * k * loaded.dims.n_heads * len(layers))
    summary = {"rows": rows, "positions": positions, "layers": len(layers), "heads": len(layers) * loaded.dims.n_heads,
               "top_k": k, "which_positions": cfg.decode.positions, "token_toxicity": scoring,
               "seconds": time.perf_counter() - t0}
    manifest = adir.finalize(config=ver.config, inputs=ver.inputs, summary=summary)
    register(ver, parents, status="complete", rows=rows, bytes_=manifest["total_bytes"], summary=summary)
    return {"version": ver.version, "path": str(adir.path), "cached": False, **summary}


def _token_toxicity(cfg: PipelineConfig, adir, tokenizer, vocab: int) -> tuple[torch.Tensor, np.ndarray, dict]:
    """Return every vocabulary id's toxicity `[V]`, its text and the scoring facts, scored once per version
    (a resumed run reads the file back).

    Embedding rows the tokenizer cannot produce (a padded vocabulary) get toxicity 0 and empty text.
    """
    if adir.shard_files(VOCAB_RECORD) is None:
        a = cfg.attribute
        vt = vocab_toxicity(tokenizer, get_scorer(a.scorer, **a.scorer_options), progress=True)
        texts = (token_texts(tokenizer) + [""] * vocab)[:vocab]
        n = min(len(vt.score), vocab)
        score, kind = np.zeros(vocab, dtype=np.float32), np.full(vocab, "non_word", dtype=object)
        score[:n], kind[:n] = vt.score[:n], vt.kind[:n]
        facts = {"scorer": vt.scorer_version, "label": vt.label, "scored_pieces": vt.n_scored}
        write_token_toxicity(adir, token_toxicity_table(texts, kind, score, facts))
    table = pq.read_table(adir.path / TOKEN_TOXICITY_FILE, columns=["token", "score"])
    facts = json.loads(table.schema.metadata[b"loralens"])
    return (torch.from_numpy(table.column("score").to_numpy().astype(np.float32)),
            np.array(table.column("token").to_pylist(), dtype=object), facts)


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
    """Return the cache version's shard indices."""
    return list(cache_ver.artifact.done_shards())


@task(name="decode", persist_result=True)  # keyed by its version in flows/common.run_stage_task
def decode_task(cfg: PipelineConfig, ver: StageVersion, train_ver: StageVersion, cache_ver: StageVersion,
                force: bool = False) -> dict[str, Any]:
    """Prefect task: the decode stage, keyed by its artifact version."""
    with failures_recorded(ver):
        return run_decode_stage(cfg, ver, train_ver, cache_ver, force=force)
