"""Every stage's predicted peak memory for a pipeline config, and the check each stage runs before it starts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from loralens.config import PipelineConfig
from loralens.lens.lenses.lens_set import LensConfig
from loralens.lens.memory.stage_memory import (
    DTYPE_BYTES,
    HOST,
    StageMemory,
    attribute_memory,
    cache_memory,
    check_fits,
    decode_memory,
    eval_memory,
    host_available,
    intervene_memory,
    lens_reader_parts,
    parts_by_device,
    select_memory,
    train_memory,
)
from loralens.lens.memory.training_plan import plan_memory
from loralens.lens.runtime.adapters import ModelDims
from loralens.lens.runtime.devices import host_compute_dtype
from loralens.lens.runtime.model_config import dims_of, load_model_config

STAGES = ("cache", "train", "eval", "decode", "attribute", "select", "intervene")


@dataclass(frozen=True)
class ModelFacts:
    """The sizes of a model that the memory predictions need (read from its config; no weights)."""

    dims: ModelDims
    n_params: int
    d_ff: int
    n_kv_heads: int
    stored_dtype: str


@lru_cache(maxsize=8)
def _facts(name: str, home: Path) -> ModelFacts:
    import torch
    from transformers import AutoModelForCausalLM

    config = load_model_config(name, home)
    dims = dims_of(config)
    with torch.device("meta"):  # parameter shapes only: no memory, a second for Llama-3-8B
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    d_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * dims.d_model
    stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return ModelFacts(dims=dims, n_params=n_params, d_ff=d_ff,
                      n_kv_heads=getattr(config, "num_key_value_heads", None) or dims.n_heads,
                      stored_dtype=stored.removeprefix("torch.") if stored.removeprefix("torch.") in DTYPE_BYTES
                      else "float32")


def model_facts(cfg: PipelineConfig) -> ModelFacts:
    """Return the facts of the config's model (cached per process)."""
    return _facts(cfg.model.name, cfg.home)


def predict(cfg: PipelineConfig, stage: str) -> StageMemory:
    """Return one stage's predicted peak for `cfg` ("eval" is the train stage's held-out evaluation)."""
    f = model_facts(cfg)
    d = f.dims
    c, t = cfg.cache, cfg.train
    n_layers = len(c.layers) if c.layers is not None else d.n_layers
    shard_tokens = c.prompts_per_shard * c.max_length
    top_k = cfg.target_top_k
    stored = (d.vocab * d.d_model + n_layers * d.z_width * d.d_model) * DTYPE_BYTES[f.stored_dtype]  # lean weights
    if stage == "cache":
        return cache_memory(d, n_params=f.n_params, d_ff=f.d_ff, model_dtype=cfg.model.resolved_dtype(),
                            batch_size=c.batch_size, max_length=c.max_length, prompts_per_shard=c.prompts_per_shard,
                            n_layers=n_layers, store_dtype=c.store_dtype, top_k=top_k)
    if stage in ("train", "eval"):
        lens = LensConfig(form=t.form, rank=t.rank, alpha=t.alpha, dtype=t.param_dtype, objective=t.objective)
        plan = plan_memory(d, lens, micro_batch_tokens=t.micro_batch_tokens, n_layers_trained=n_layers,
                           top_k=max(top_k, 1), loss=t.loss, chunk=t.loss_chunk, world_size=t.world_size,
                           zero_stage=t.zero_stage, base_dtype=t.base_dtype)
        common = dict(shard_tokens=shard_tokens, n_layers=n_layers, store_dtype=c.store_dtype, top_k=top_k)
        ranks_here = 1 if t.hostfile else t.world_size
        if stage == "eval":
            return eval_memory(plan, d, micro_batch=t.micro_batch_tokens, ranks_here=ranks_here, **common)
        return train_memory(plan, d, micro_batch=t.micro_batch_tokens, loss_chunk=t.loss_chunk,
                            world_size=t.world_size, zero_stage=t.zero_stage, ranks_here=ranks_here, **common)
    if stage == "decode":
        positions = shard_tokens if cfg.decode.positions == "all" else c.prompts_per_shard
        return decode_memory(d, n_layers=n_layers, form=t.form, rank=t.rank, stored_bytes=stored,
                             chunk=cfg.decode.chunk_tokens, shard_tokens=shard_tokens, positions=positions,
                             store_dtype=c.store_dtype, top_k=cfg.decode.top_k)
    if stage == "attribute":
        per_file = cfg.corpus.max_prompts_per_file or 100_000  # no cap: assume a large RealToxicityPrompts-sized file
        return attribute_memory(d, n_prompts=per_file * len(cfg.corpus.paths))
    if stage in ("select", "intervene"):
        i, sel = cfg.intervene, cfg.select
        dtype = host_compute_dtype(cfg.model.resolved_dtype(), cfg.model.torch_device())  # float32 on a CPU
        sampling = intervene_memory(d, n_params=f.n_params, model_dtype=dtype,
                                    batch_prompts=i.batch_prompts, k=sel.k if stage == "select" else i.k,
                                    tokens=c.max_length + i.max_new_tokens, n_layers_total=d.n_layers,
                                    n_kv_heads=f.n_kv_heads, ppl_window=i.ppl_window,
                                    stored_dtype=f.stored_dtype)
        if stage == "intervene":
            return sampling
        st = sel.steering
        reader = sum(b for _, b in lens_reader_parts(d, n_layers=n_layers, form=t.form, rank=t.rank,
                                                     stored_bytes=stored))
        return select_memory(d, n_params=f.n_params, d_ff=f.d_ff, model_dtype=dtype,
                             batch_prompts=sel.batch_prompts,
                             forced_tokens=sel.max_prompt_tokens + sel.max_continuation_tokens, sampling=sampling,
                             lens_reader=reader if st.enabled and "lens" in st.sources else 0)
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def predict_all(cfg: PipelineConfig) -> list[StageMemory]:
    """Return every stage's prediction, in pipeline order."""
    return [predict(cfg, s) for s in STAGES]


SPLIT_STAGES = ("cache", "decode", "intervene")  # the stages whose work units Dask worker processes run


def on_workers(mem: StageMemory, workers: int) -> StageMemory:
    """Return a split stage's peak on a machine running `workers` local Dask worker processes of it: each holds
    its own model copy, so the per-worker peak times `workers` (unchanged for `workers <= 1`)."""
    if workers <= 1:
        return mem
    return replace(mem, processes=mem.processes * workers, process_kind="local Dask workers",
                   shrink=f"{mem.shrink}, or run.workers (now {workers})")


MODEL_STAGES = ("cache", "select", "intervene")  # the stages that load the full model, with model.device_map


def spreads(device: str, stage: str, processes: int, device_map: str | None) -> bool:
    """Return whether Hugging Face's `device_map` spreads `stage`'s model over every visible GPU (`spread_by_device`).

    Only with a `device_map`, on a GPU (`device`: the resolved model device; on a CPU the model stays on the host and
    the check is the CPU one), in a stage that loads the full model (`MODEL_STAGES`: train and decode read the model
    lean, onto their process's GPU) and in one process: local Dask workers each see only their own GPU
    (`CUDA_VISIBLE_DEVICES`), so a worker's `device_map` places its model on that one GPU, as without it.
    """
    return bool(device_map) and device.startswith("cuda") and stage in MODEL_STAGES and processes <= 1


def stage_gpus(device: str, processes: int, n_gpus: int, spread: bool = False) -> tuple[str, ...]:
    """Return the GPU each of a stage's `processes` computes on, for `parts_by_device`, or, with `spread` (see
    `spreads`), the `n_gpus` visible GPUs a `device_map` spreads the one process's model over, for `spread_by_device`.

    `device`: the resolved model device ("cpu", "cuda:N"). A CPU run has none: every part is checked against host
    RAM. One process computes on `device`; several (training ranks, local Dask workers) take GPU i for process i (the
    launcher's LOCAL_RANK, `LoraLensWorker`), cycling over the `n_gpus` GPUs.
    """
    if not device.startswith("cuda"):
        return ()
    if spread:
        return tuple(f"cuda:{i}" for i in range(max(n_gpus, 1)))
    if processes <= 1:
        return (device if ":" in device else "cuda:0",)
    return tuple(f"cuda:{i % max(n_gpus, 1)}" for i in range(processes))


def config_gpus(cfg: PipelineConfig, processes: int, spread: bool = False) -> tuple[str, ...]:
    """Return `stage_gpus` for `processes` processes of `cfg`'s model on this machine (none on a CPU)."""
    import torch

    device = cfg.model.torch_device()
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    return stage_gpus(str(device), processes, n_gpus, spread)


def ensure_fits(cfg: PipelineConfig, stage: str, workers: int = 1) -> None:
    """Refuse (one line, before anything is loaded) a stage whose predicted peak exceeds the memory available on
    any device: its host parts against RAM, on a GPU run its GPU parts against each GPU's free memory (`stage_gpus`;
    a model spread by `model.device_map`: its share on each visible GPU, `spreads`).

    `workers`: the local Dask cluster's worker processes a split stage (SPLIT_STAGES) runs on, on this machine;
    the check is then of `workers` times one worker's peak (the flow process checks before it maps the units).
    """
    mem = predict(cfg, stage)
    mems = [on_workers(mem, workers) if stage in SPLIT_STAGES else mem]
    if stage == "train":
        mems.append(predict(cfg, "eval"))
    for m in mems:
        spread = spreads(str(cfg.model.torch_device()), m.stage, m.processes, cfg.model.device_map)
        check_fits(m, gpus=config_gpus(cfg, m.processes, spread), spread=spread)


# A local Dask worker's memory_limit over its predicted peak: Dask pauses a worker at 80% of its limit and restarts
# it at 95%; the worker process also carries distributed and Prefect beside the stage's runtime.
WORKER_HEADROOM = 1.5
WORKER_OVERHEAD_BYTES = 2**30
CUDA_HOST_BYTES = 2 * 2**30  # host memory a process adds once CUDA is up (driver, cuBLAS/cuDNN kernels): on GPU runs


def worker_limit_bytes(peaks: list[int], workers: int, host_bytes: int, headroom: float = WORKER_HEADROOM,
                       overhead: int = WORKER_OVERHEAD_BYTES) -> int:
    """Return a local Dask worker's `memory_limit`: the largest of the predicted host peaks (`peaks`) of the stages it
    runs, times `headroom`, plus `overhead`, capped by an equal share of the host's memory (`host_bytes // workers`)."""
    return int(min(max(peaks) * headroom + overhead, host_bytes // max(workers, 1)))


def worker_memory_limit(cfg: PipelineConfig, workers: int) -> int:
    """Return the `memory_limit` of each of `workers` local Dask workers running `cfg`'s split stages: one worker's
    host peak per stage (on a GPU run its host parts and CUDA's host memory), `worker_limit_bytes` of the memory
    available now (`host_available`)."""
    cuda_host = CUDA_HOST_BYTES if cfg.model.torch_device().type == "cuda" else 0
    gpus = config_gpus(cfg, 1)
    peaks = [parts_by_device(predict(cfg, stage), gpus)[HOST] + cuda_host for stage in SPLIT_STAGES]
    return worker_limit_bytes(peaks, workers, host_available())
