"""The `decode` stage: every head's top-k tokens under its trained lens and the logit lens, to Parquet + DuckDB."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import task
from tqdm.auto import tqdm

from loralens.config import PipelineConfig
from loralens.lens.readout import head_logits_both, top_k
from loralens.lens.vocab_toxicity import token_texts
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
from loralens.warehouse.db import warehouse_path
from loralens.warehouse.decodings import decodings_block, load_shard_into_db, write_decode_shard
from loralens.warehouse.versions import artifact_version

STAGE = "decode"


def decode_version(cfg: PipelineConfig, train_ver: StageVersion) -> StageVersion:
    """Return the decode stage's version: a hash of the decode config and the train version."""
    config = {"decode": cfg.decode.model_dump(exclude={"chunk_tokens"})}
    inputs = {"train": train_ver.version}
    return StageVersion(STAGE, artifact_version(STAGE, config, inputs), config, inputs, cfg.home)


def load_into_warehouse(ver: StageVersion) -> int:
    """Bulk-load every finished shard that the warehouse lacks (one transaction each); return shards loaded."""
    db = warehouse_path(ver.home)
    loaded = 0
    for index, files in sorted(ver.artifact.done_shards().items()):
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
    texts = np.array(token_texts(loaded.tokenizer) + [""] * max(0, loaded.dims.vocab - len(loaded.tokenizer)),
                     dtype=object)
    shards = sorted(cache_shard_indices(cache_ver))
    k, chunk = cfg.decode.top_k, cfg.decode.chunk_tokens
    with tqdm(total=len(shards) * len(layers), desc="decode", unit="layer") as bar:
        for shard in shards:
            if adir.shard_files(shard) is not None:
                bar.update(len(layers))
                continue
            pos = select_positions(cache_ver.artifact, shard, cfg.decode.positions)
            blocks = []
            for layer in layers:
                parts = {"trained": [], "logit": []}
                for _rows, x in layer_input_chunks(cache_ver.artifact, pos, layer, reader,
                                                   cache_manifest["summary"], chunk):
                    trained, logit = head_logits_both(reader.banks[layer], x)
                    parts["trained"].append(top_k(trained, k))
                    parts["logit"].append(top_k(logit, k))
                for lens, tops in parts.items():
                    ids = np.concatenate([t.ids.numpy() for t in tops])
                    vals = np.concatenate([t.logits.numpy() for t in tops])
                    probs = np.concatenate([t.probs.numpy() for t in tops])
                    blocks.append(decodings_block(shard, layer, lens, pos.prompt_idx, pos.position, ids, vals,
                                                  probs, texts))
                bar.update(1)
            f = write_decode_shard(adir, shard, pa.concat_tables(blocks))
            load_shard_into_db(db, ver.version, shard, adir.path / f.path, f.rows)
    load_into_warehouse(ver)
    done = adir.done_shards()
    rows = sum(files[0].rows for files in done.values())
    positions = rows // (2 * k * loaded.dims.n_heads * len(layers))
    summary = {"rows": rows, "positions": positions, "layers": len(layers), "heads": len(layers) * loaded.dims.n_heads,
               "top_k": k, "which_positions": cfg.decode.positions, "seconds": time.perf_counter() - t0}
    manifest = adir.finalize(config=ver.config, inputs=ver.inputs, summary=summary)
    register(ver, parents, status="complete", rows=rows, bytes_=manifest["total_bytes"], summary=summary)
    return {"version": ver.version, "path": str(adir.path), "cached": False, **summary}


def cache_shard_indices(cache_ver: StageVersion) -> list[int]:
    """Return the cache version's shard indices."""
    return list(cache_ver.artifact.done_shards())


@task(name="decode", cache_key_fn=lambda _ctx, params: f"loralens-decode-{params['ver'].version}",
      persist_result=True)
def decode_task(cfg: PipelineConfig, ver: StageVersion, train_ver: StageVersion, cache_ver: StageVersion,
                force: bool = False) -> dict[str, Any]:
    """Prefect task: the decode stage, keyed by its artifact version."""
    with failures_recorded(ver):
        return run_decode_stage(cfg, ver, train_ver, cache_ver, force=force)
