"""The checks `loralens run` makes before its pipeline starts (no Prefect server, no flow run): every error a run's
config and this machine reveal, raised as the same one-line error the stage would raise later.

The stages keep their own checks (a flow started from a deployment or the Python API never passes through here);
this module calls the same functions, in the order a run would meet them:

- inputs: `model.device` / `model.dtype` on this machine, the hostfile, the model (an unknown name, a folder
  without config.json, an unsupported architecture), the prompt files and `corpus.text_paths`;
- the local Dask workers of a GPU run get one GPU each (`check_local_workers`);
- then, for each stage the run executes whose version is not complete (or every one with `force`): with `only`,
  the upstream versions it reads are complete (`require_complete`); for train, the cache holds enough tokens and a
  shard per rank (`check_enough_tokens`, `check_enough_shards`, from the cache's manifest or, before the cache
  exists, from the shards the cache stage will write) and `model.device` suits its ranks (`training_devices`); its
  predicted peak memory fits this machine's host and GPUs with the run's local Dask workers (`ensure_fits`).

The versions are computed as the flows compute them (`stage_chain`); that needs `model.dtype` pinned
(`flows.common.pin_dtype`). A config still at `auto` (the workers of an existing Dask scheduler resolve it) gets the
checks that need no version only; the stages check the rest.
"""

from __future__ import annotations

import os

from loralens.config import PipelineConfig
from loralens.lens.runtime.devices import check_local_workers, resolve_device, resolve_dtype
from loralens.tasks.chain import stage_chain
from loralens.tasks.memory import ensure_fits, model_facts
from loralens.tasks.registry import REGISTRY, Stage, get_stage
from loralens.tasks.stage_versions import StageVersion, require_complete
from loralens.tasks.stages.cache import cache_version, planned_inputs
from loralens.tasks.stages.train import check_enough_shards, check_enough_tokens, hostfile_world_size, training_devices

# The last stage whose version needs no complete upstream: intervene's names the heads that complete select and
# attribute versions resolve (tasks/chain.py).
LAST_PLAIN_VERSION = "select"


def check_inputs(cfg: PipelineConfig) -> StageVersion:
    """Check what a run reads before any stage: the device and dtype here, the hostfile, the model, the prompt files
    and text files; return the cache version (its computation resolves the model and reads the corpus)."""
    resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device))
    if cfg.train.hostfile:
        hostfile_world_size(cfg.train.hostfile)
    ver = cache_version(cfg)  # the model's path (converting an embedded one, once), the prompt and text files
    model_facts(cfg)  # its config: an architecture the adapters do not support fails here, before any weight
    return ver


def upstream_of(stage: Stage) -> tuple[str, ...]:
    """Return the stages whose complete versions `stage`'s run reads: its parents and the cache (every later stage
    reads its prompts or shards; intervene's version itself requires complete attribute and select versions)."""
    return tuple(dict.fromkeys((*stage.parents, *(("cache",) if stage.name != "cache" else ()))))


def planned_versions(cfg: PipelineConfig, only: str | None, cache_ver: StageVersion) -> dict[str, StageVersion]:
    """Return the versions of the stages a run of `only` (None: every stage) computes, as its flows do.

    `only` gets the chain through it (an intervene whose upstream is not complete raises `require_complete`'s
    error). A whole run gets the chain through LAST_PLAIN_VERSION, and intervene's version only when every version
    before it is already complete (otherwise this run makes them: intervene will run).
    """
    if only is not None:
        return stage_chain(cfg, only, cache_ver)
    chain = stage_chain(cfg, LAST_PLAIN_VERSION, cache_ver)
    if all(v.artifact.is_complete() for v in chain.values()):
        chain = stage_chain(cfg, REGISTRY[-1].name, cache_ver)
    return chain


def check_training_data(cfg: PipelineConfig, cache_ver: StageVersion) -> None:
    """Check the cache feeds every training rank (`check_enough_tokens`, `check_enough_shards`): its manifest's
    counts, or before it exists the shards the cache stage will write (`planned_inputs`: tokenizes the corpus)."""
    manifest = cache_ver.artifact.manifest()
    if manifest is not None:
        n_tokens, n_shards = manifest["summary"]["n_tokens"], manifest["n_shards"]
    else:
        plan = planned_inputs(cfg)
        n_tokens, n_shards = plan.n_tokens, len(plan.shards)
    check_enough_tokens(cfg.train, n_tokens)
    check_enough_shards(cfg.train, n_shards)
    training_devices(cfg.model.device, cfg.train.world_size, os.environ.get("CUDA_VISIBLE_DEVICES"))


def preflight(cfg: PipelineConfig, only: str | None = None, *, force: bool = False, workers: int = 1) -> None:
    """Raise the first error a run of `cfg` would meet (`only`: that stage alone; `force`: every stage runs again;
    `workers`: the run's local Dask workers on this machine, `flows.common.local_workers`); see the module doc.

    `cfg` as the flow runs it: `model.dtype` pinned (`flows.common.pin_dtype`); left at `auto`, only the checks that
    need no version run.

    Reads the prompt and text files and the model's config (converting an embedded model once, as the run would);
    tokenizes the corpus only when train runs before its cache exists; loads no weights, writes nothing in the home.
    """
    cache_ver = check_inputs(cfg)
    check_local_workers(cfg.model.device, workers)
    if cfg.model.dtype == "auto":
        return  # the scheduler's workers pin it: the versions are theirs to hash
    stages = REGISTRY if only is None else (get_stage(only),)
    versions = planned_versions(cfg, only, cache_ver)
    for stage in stages:
        ver = versions.get(stage.name)
        if ver is not None and not force and ver.artifact.is_complete():
            continue  # reused as it is
        if only is not None:
            for name in upstream_of(stage):
                require_complete(versions[name])
        if stage.name == "train":
            check_training_data(cfg, versions["cache"])
        ensure_fits(cfg, stage.name, workers=workers)
