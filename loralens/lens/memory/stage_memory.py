"""Peak resident memory of every stage, predicted from sizes before the stage starts, and the check against it.

Arithmetic only (no tensors). Each stage's peak is a sum of named parts, each written out below; the largest
process of the stage counts (for training: one rank, times the ranks on this machine). `check_fits` compares
a prediction with the memory available now and refuses a run that will not fit, in one line that names the
stage, both numbers and the settings that shrink it.

Each part lives on a device: the parts named in `StageMemory.gpu_parts` (weights, activations, lens states) on
the GPU a process computes on when the model device is a GPU, the rest (runtime, Parquet shards, output rows)
on the host. `parts_by_device` places a stage's processes; `check_fits_per_device` checks every device: the
host against RAM, each GPU against its free memory (`gpu_free_memory`, through NVML where it answers). On a CPU
everything is on the host. A model spread over several GPUs by Hugging Face's `device_map` is placed by
`spread_by_device` instead: its per-layer parts (`SPREAD_PARTS`) split evenly over the GPUs.

Notation as in :mod:`loralens.lens.memory.training_plan`: ``B`` prompts per batch, ``T`` tokens per prompt
(cache.max_length),
``L`` lensed layers, ``H`` heads, ``d`` d_model, ``dff`` MLP width, ``V`` vocab, ``s`` cache store bytes,
``mb`` model dtype bytes, ``c`` positions per decode chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loralens.lens.heads.directions import LENS_BLOCKS, lens_direction_chunk
from loralens.lens.lenses.lens_set import trainable_per_head
from loralens.lens.lenses.objective import eval_chunk
from loralens.lens.memory.gpu_free import nvml_free_bytes
from loralens.lens.memory.memory_plan import MemoryPlan
from loralens.lens.memory.training_plan import F32
from loralens.lens.runtime.adapters import ModelDims

# Resident set of a stage process before it allocates anything: the interpreter with torch, transformers,
# pyarrow, duckdb (and deepspeed plus gloo for a training rank) imported. Measured on this CPU build
# (torch 2.13): 280-300 MB after the imports, ~450 MB after the first forward / collective.
RUNTIME_BYTES = 512 * 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class MemoryBudgetError(RuntimeError):
    """A stage would not fit in the memory available; the message is one line."""


@dataclass(frozen=True)
class StageMemory:
    """A stage's predicted peak resident bytes, as named parts, and the settings that would shrink it."""

    stage: str
    parts: tuple[tuple[str, int], ...]
    shrink: str  # e.g. "train.micro_batch_tokens (now 256), train.loss_chunk (now 128)"
    processes: int = 1  # processes of this size on one machine (training ranks, local Dask workers)
    process_kind: str = "processes"  # what they are, in the error
    gpu_parts: frozenset[str] = frozenset()  # the parts on the compute device when it is a GPU (the rest: host)

    @property
    def per_process(self) -> int:
        """Return the predicted peak of one process."""
        return sum(b for _, b in self.parts)

    @property
    def total(self) -> int:
        """Return the predicted peak of the stage on this machine (all its processes together)."""
        return self.per_process * self.processes


def gib(n: float) -> str:
    """Return bytes as 'x.y GB' (GiB)."""
    return f"{n / 2**30:.1f} GB"


# -- the stages -------------------------------------------------------------------------------------
def cache_memory(dims: ModelDims, *, n_params: int, d_ff: int, model_dtype: str, batch_size: int,
                 max_length: int, prompts_per_shard: int, n_layers: int, store_dtype: str,
                 top_k: int) -> StageMemory:
    """Return the cache stage's peak: the whole model runs.

    - weights ``P mb``;
    - one forward: logits ``B T V (mb + 4 + 4)`` (model-dtype logits, the fp32 log-sum-exp's and top-k's
      temporaries), plus one layer's transients ``B T (4 d + 3 dff) mb`` and the attention scores ``B H T^2 4``;
    - captured ``z`` of every cached layer for the batch ``B T L H dh mb`` and the final residual ``B T d 4``;
    - one shard's arrays, twice (the numpy batches and their Arrow table while the writer thread encodes):
      ``2 Ps T (L H dh s + d 4 + k 8 + 40)``.
    """
    mb, s = DTYPE_BYTES[model_dtype], DTYPE_BYTES[store_dtype]
    bt = batch_size * max_length
    per_token_row = n_layers * dims.z_width * s + dims.d_model * F32 + top_k * 8 + 40
    parts = (
        ("runtime", RUNTIME_BYTES),
        ("model weights", n_params * mb),
        ("logits and vocabulary reductions", bt * dims.vocab * (mb + 2 * F32)),
        ("layer transients", bt * (4 * dims.d_model + 3 * d_ff) * mb
         + batch_size * dims.n_heads * max_length ** 2 * F32),
        ("captured z", bt * (n_layers * dims.z_width * mb + dims.d_model * F32)),
        ("one shard, arrays + Arrow", 2 * prompts_per_shard * max_length * per_token_row),
    )
    return StageMemory("cache", parts, f"cache.batch_size (now {batch_size}), cache.prompts_per_shard (now "
                                       f"{prompts_per_shard}), model.dtype (now {model_dtype})",
                       gpu_parts=frozenset(name for name, _ in parts[1:5]))


def shard_bytes(dims: ModelDims, *, tokens: int, n_layers: int, store_dtype: str, top_k: int) -> int:
    """Return one cache shard as a training rank loads it: ``tokens (2 L H dh s + d 4 + k 8 + 12)``.

    z is read layer by layer and stacked (twice, briefly); h_final fp32; top-k ids and log-probs; scale, index.
    """
    return tokens * (2 * n_layers * dims.z_width * DTYPE_BYTES[store_dtype] + dims.d_model * F32 + top_k * 8 + 12)


def train_memory(plan: MemoryPlan, dims: ModelDims, *, shard_tokens: int, n_layers: int, store_dtype: str,
                 top_k: int, micro_batch: int, loss_chunk: int, world_size: int, zero_stage: int,
                 ranks_here: int = 1) -> StageMemory:
    """Return one training rank's peak: the plan's step peak (frozen base, state, activations) + one shard.

    The frozen base is read lean (:mod:`loralens.lens.runtime.lean`): while it loads, the stored-dtype unembedding
    sits beside its fp32 copies for a moment, never more than the plan's frozen bytes plus ``V d 2``.
    `ranks_here`: ranks on this machine (all of them on one node; a hostfile's layout is not known: one).
    """
    parts = (
        ("runtime", RUNTIME_BYTES),
        ("frozen base (fp32 W_fold, lm_head, W_O, bf16 base)", plan.frozen_bytes),
        ("parameters, gradients, optimizer", plan.state_bytes),
        ("step activations / optimizer transient", max(plan.activation_bytes, plan.step_transient_bytes)
         + plan.batch_bytes),
        ("one cache shard", shard_bytes(dims, tokens=shard_tokens, n_layers=n_layers, store_dtype=store_dtype,
                                        top_k=top_k)),
    )
    shrink = (f"train.micro_batch_tokens (now {micro_batch}), train.loss_chunk (now {loss_chunk}), fewer "
              f"cache.layers (now {n_layers}), train.world_size on this machine (now {world_size}), "
              f"train.zero_stage (now {zero_stage})")
    return StageMemory("train", parts, shrink, processes=max(1, ranks_here),
                       gpu_parts=frozenset(name for name, _ in parts[1:4]))


def eval_memory(plan: MemoryPlan, dims: ModelDims, *, shard_tokens: int, n_layers: int, store_dtype: str,
                top_k: int, micro_batch: int, ranks_here: int = 1) -> StageMemory:
    """Return one rank's peak during held-out evaluation (after training, in the same process; every rank evaluates
    its share of the held-out prompts, `ranks_here` of them on this machine).

    Frozen base + the consolidated fp32 lenses (``params 4``, twice while loading the state dict) + one
    micro-batch's target logits ``T V 4`` + three ``[c, H, V]`` fp32 blocks (c = :func:`eval_chunk`) + one shard.
    """
    c = min(micro_batch, eval_chunk(dims.n_heads, dims.vocab))
    parts = (
        ("runtime", RUNTIME_BYTES),
        ("frozen base", plan.frozen_bytes),
        ("consolidated lenses", 2 * plan.params_total * F32),
        ("target logits of a chunk", 3 * c * dims.vocab * F32),
        ("[chunk, heads, vocab] blocks", 3 * c * dims.n_heads * dims.vocab * F32),
        ("one cache shard", shard_bytes(dims, tokens=shard_tokens, n_layers=n_layers, store_dtype=store_dtype,
                                        top_k=top_k)),
    )
    return StageMemory("eval", parts, f"train.micro_batch_tokens (now {micro_batch})", processes=max(1, ranks_here),
                       gpu_parts=frozenset(name for name, _ in parts[1:5]))


def lens_reader_parts(dims: ModelDims, *, n_layers: int, form: str, rank: int, stored_bytes: int
                      ) -> tuple[tuple[str, int], ...]:
    """Return the trained lenses read lean (decode, select's `lens` directions): the lean weights as stored
    (unembedding, norm, W_O of the L layers), their fp32 fold ``V d 4`` and fp32 W_O, the banks ``L H per_head 4``."""
    banks = n_layers * dims.n_heads * trainable_per_head(form, rank, dims.d_model, dims.vocab) * F32
    w_o = n_layers * dims.z_width * dims.d_model * F32
    return (("lean weights as stored", stored_bytes),
            ("fp32 folded unembedding and W_O", dims.vocab * dims.d_model * F32 + w_o),
            ("lens banks", banks))


def decode_memory(dims: ModelDims, *, n_layers: int, form: str, rank: int, stored_bytes: int, chunk: int,
                  shard_tokens: int, positions: int, store_dtype: str, top_k: int) -> StageMemory:
    """Return the decode stage's peak: lenses read lean, heads read chunk by chunk in one pass.

    - the lean parts as stored (unembedding, norm, W_O of L layers), their fp32 fold ``V d 4`` and fp32 W_O;
    - the lens banks of every layer ``L H per_head 4``;
    - one layer's z of one shard ``tokens H dh (s + 4)`` and its lens inputs ``c H d 4``;
    - ``[c, H, V]`` fp32 blocks: the logit-lens projection, the low-rank update's temporaries and the trained
      logits (4 blocks; the top-k and expected toxicity then overwrite a block in place);
    - a shard's top-k rows ``positions L H k 2 * 16`` and readout rows ``positions L H 24`` before it is written.
    """
    s = DTYPE_BYTES[store_dtype]
    parts = (
        ("runtime", RUNTIME_BYTES),
        *lens_reader_parts(dims, n_layers=n_layers, form=form, rank=rank, stored_bytes=stored_bytes),
        ("one layer of a shard", shard_tokens * dims.z_width * (s + F32) + chunk * dims.n_heads * dims.d_model * F32),
        ("[chunk, heads, vocab] blocks", 4 * chunk * dims.n_heads * dims.vocab * F32),
        ("a shard's top-k and readout rows", positions * n_layers * dims.n_heads * (top_k * 2 * 16 + 24)),
    )
    return StageMemory("decode", parts, f"decode.chunk_tokens (now {chunk}), fewer cache.layers (now {n_layers})",
                       gpu_parts=frozenset(name for name, _ in parts[1:6]))


def attribute_memory(dims: ModelDims, *, n_prompts: int) -> StageMemory:
    """Return the attribute stage's peak: no model weights, only what decode stored, aggregated by DuckDB.

    - the vocabulary's text, kind and toxicity ``V 256`` (Python strings);
    - the prompts with their texts ``prompts 2048``;
    - DuckDB's working memory, capped at its 1 GiB ``memory_limit`` (it spills to disk beyond).
    """
    parts = (
        ("runtime", RUNTIME_BYTES),
        ("vocabulary texts and scores", dims.vocab * 256),
        ("prompts", n_prompts * 2048),
        ("DuckDB aggregation (memory_limit)", 2**30),
    )
    return StageMemory("attribute", parts, "the corpus (attribute holds no model weights)")


def intervene_memory(dims: ModelDims, *, n_params: int, model_dtype: str, batch_prompts: int, k: int,
                     tokens: int, n_layers_total: int, n_kv_heads: int, ppl_window: int,
                     stored_dtype: str | None = None) -> StageMemory:
    """Return the intervene stage's peak: the whole model samples ``batch_prompts * k`` continuations at once,
    or, when it computes in another dtype than its files store (`stored_dtype`: a bf16 model in float32 on a
    CPU), its loading, if larger.

    weights ``P mb``; KV cache ``2 N_layers B k tokens n_kv dh mb``; one step's logits ``B k V 4 * 3`` (fp32
    softmax and nucleus sort); perplexity windows ``W V (mb + 8)``. Converting while loading keeps the stored
    weights mapped (``P sb``, resident until the files close) beside the converted ones (measured on the 2-layer
    Llama-3-8B shape: 8.85 GB for 5.95 GB of fp32 weights from 2.97 GB of bf16 files).
    """
    mb = DTYPE_BYTES[model_dtype]
    rows = batch_prompts * k
    parts = (
        ("runtime", RUNTIME_BYTES),
        ("model weights", n_params * mb),
        ("KV cache", 2 * n_layers_total * rows * tokens * n_kv_heads * dims.d_head * mb),
        ("sampling logits", rows * tokens * dims.vocab * mb + 3 * rows * dims.vocab * F32),
        ("perplexity window logits", ppl_window * dims.vocab * (mb + 2 * F32)),
    )
    if stored_dtype is not None and stored_dtype != model_dtype:
        loading = (("runtime", RUNTIME_BYTES), ("model weights", n_params * mb),
                   ("stored weights mapped while converting", n_params * DTYPE_BYTES[stored_dtype]))
        parts = max(parts, loading, key=lambda ps: sum(b for _, b in ps))
    return StageMemory("intervene", parts, f"intervene.batch_prompts (now {batch_prompts}), intervene.k (now {k}), "
                                           f"model.dtype (now {model_dtype})",
                       gpu_parts=frozenset(name for name, _ in parts[1:]) - {"stored weights mapped while converting"})


def select_memory(dims: ModelDims, *, n_params: int, d_ff: int, model_dtype: str, batch_prompts: int,
                  forced_tokens: int, sampling: StageMemory, lens_reader: int = 0) -> StageMemory:
    """Return the select stage's peak: the largest of its sampling (as intervene's, at select.k), attribution
    patching's one forward + backward over ``B = batch_prompts`` teacher-forced rows of ``T = forced_tokens``,
    and, with steering along the `lens` source, the lens directions (`lens_reader` bytes: the trained lenses read
    as decode reads them, beside the model).

    The backward keeps every layer's activations, ``B T N_layers (8 d_model + 3 d_ff) mb`` (residual, norms,
    q/k/v/o, MLP), and the logits with their fp32 softmax and gradient, ``B T V (mb + 3 * 4)``. The lens
    directions hold `LENS_BLOCKS` fp32 ``[chunk, H, V]`` blocks (`lens_direction_chunk`).
    """
    mb = DTYPE_BYTES[model_dtype]
    rows = batch_prompts * forced_tokens
    backward = (
        ("runtime", RUNTIME_BYTES),
        ("model weights", n_params * mb),
        ("activations kept for backward", rows * dims.n_layers * (8 * dims.d_model + 3 * d_ff) * mb),
        ("logits, softmax and gradient", rows * dims.vocab * (mb + 3 * F32)),
    )
    chunk = lens_direction_chunk(dims.n_heads, dims.vocab)
    directions = (
        ("runtime", RUNTIME_BYTES),
        ("model weights", n_params * mb),
        ("trained lenses (lean weights, fp32 fold, banks)", lens_reader),
        ("lens-direction [chunk, heads, vocab] blocks", LENS_BLOCKS * chunk * dims.n_heads * dims.vocab * F32),
    ) if lens_reader else ()
    parts = max(backward, sampling.parts, directions, key=lambda ps: sum(b for _, b in ps))
    return StageMemory("select", parts, f"select.batch_prompts (now {batch_prompts}), select.k, "
                                        f"select.steering.sources (`lens` reads the trained lenses), "
                                        f"model.dtype (now {model_dtype})",
                       gpu_parts=sampling.gpu_parts | {name for name, _ in (*backward[1:], *directions[1:])})


# -- available memory and the check ---------------------------------------------------------------------
def available_memory() -> int:
    """Return the bytes this process can still allocate: MemAvailable, capped by a cgroup limit if one is set."""
    import psutil

    avail = psutil.virtual_memory().available
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 2**60:
                avail = min(avail, int(cap) - int(Path(used).read_text()))
        except (OSError, ValueError):
            continue
    return avail


HOST = "host"  # the device name of host RAM in `parts_by_device` and the checks


def parts_by_device(mem: StageMemory, gpus: tuple[str, ...] = ()) -> dict[str, int]:
    """Return the stage's predicted peak bytes on each device, e.g. ``{"host": ..., "cuda:0": ..., "cuda:1": ...}``.

    `gpus`: the GPU each of the stage's processes computes on, in process order (process i on
    ``gpus[i % len(gpus)]``): its `gpu_parts` are there, its other parts on the host. Empty (a CPU run): every part
    of every process is on the host.
    """
    on_gpu = sum(b for name, b in mem.parts if name in mem.gpu_parts) if gpus else 0
    needed = {HOST: (mem.per_process - on_gpu) * mem.processes}
    for i in range(mem.processes if gpus else 0):
        needed[gpus[i % len(gpus)]] = needed.get(gpus[i % len(gpus)], 0) + on_gpu
    return needed


# The parts that follow the model's layers: under a `device_map` each GPU holds its layers' share of them.
SPREAD_PARTS = frozenset({"model weights", "KV cache", "activations kept for backward"})


def spread_by_device(mem: StageMemory, gpus: tuple[str, ...]) -> dict[str, int]:
    """Return a one-process stage's predicted peak bytes on each device when Hugging Face's `device_map` spreads
    its model over `gpus` (every visible GPU), e.g. ``{"host": ..., "cuda:0": ..., "cuda:1": ...}``.

    An approximation of accelerate's "auto" (balanced) placement: the parts that follow the layers
    (`SPREAD_PARTS`: the weights, intervene's KV cache, select's activations kept for backward) split evenly by bytes
    over the N GPUs, ``ceil(bytes / N)`` each; the stage's other GPU parts (logits, one layer's transients, captured
    z, lens blocks) are counted whole on every GPU (the first GPU holds the inputs, the last the logits, each one
    layer's transients while it runs them: any of them may be the one that peaks). The host keeps what is not a GPU
    part (runtime, shards, output rows, stored weights mapped while converting). accelerate would offload what
    does not fit to the host or disk; the check refuses instead. Empty `gpus` (a CPU run): `parts_by_device`.
    """
    if not gpus:
        return parts_by_device(mem)
    spread = sum(b for name, b in mem.parts if name in mem.gpu_parts and name in SPREAD_PARTS)
    whole = sum(b for name, b in mem.parts if name in mem.gpu_parts and name not in SPREAD_PARTS)
    share = -(-spread // len(gpus))
    return {HOST: mem.total - (spread + whole) * mem.processes, **{gpu: share + whole for gpu in gpus}}


def check_fits_per_device(mem: StageMemory, needed: dict[str, int], free: dict[str, int],
                          spread_over: int = 0) -> None:
    """Raise MemoryBudgetError (one line, naming the device) for the first device whose predicted bytes
    (`needed`, from `parts_by_device` or `spread_by_device`) exceed its `free` bytes (host: the memory available; a
    GPU: its free memory). A device missing from `free` is not checked. `spread_over`: the GPUs a `device_map`
    spreads the model over (`spread_by_device`), named in a GPU's error with the suggestion to use more of them."""
    host_share = mem.per_process - sum(b for name, b in mem.parts if name in mem.gpu_parts)
    for device, need in needed.items():
        if device not in free or need <= free[device]:
            continue
        if device == HOST:
            share = host_share if len(needed) > 1 else mem.per_process  # a CPU run: every part is on the host
            where, avail = "", f"available {gib(free[device])} on the host"
        else:
            share = mem.per_process - host_share
            where, avail = f" on {device}", f"{gib(free[device])} free there"
        count = need // share if share else 1
        procs = f" ({count} {mem.process_kind} x {gib(share)})" if count > 1 else ""
        more = ""
        if spread_over and device != HOST:
            procs = f" (its share of the model spread by model.device_map over {spread_over} GPU(s))"
            more = f", or make more GPUs visible (CUDA_VISIBLE_DEVICES, now {spread_over})"
        raise MemoryBudgetError(f"{mem.stage} stage will not fit in memory{where}: predicted peak {gib(need)}{procs}, "
                                f"{avail}; to fit, lower {mem.shrink}{more}")


def host_available(available: int | None = None) -> int:
    """Return the host memory a stage may use: LORALENS_MEMORY_LIMIT (bytes, or with a G/M suffix; tests, shared
    nodes) when set, else `available`, else the memory available now (`available_memory`)."""
    return memory_limit() or (available_memory() if available is None else available)


def gpu_free_memory(gpus: tuple[str, ...]) -> dict[str, int]:
    """Return the bytes a stage in this process can use on each GPU in `gpus` ("cuda:N"): the free memory the driver
    reports now plus what this process already reserves there (a Dask worker's held model and cached blocks are part
    of the peak the prediction counts, so a worker's second unit is not refused for its own model).

    Free memory is read through NVML where it answers (`nvml_free_bytes`: no CUDA context in the checking process),
    else `torch.cuda.mem_get_info` (which creates one on each GPU it asks about). `memory_reserved` is 0, and
    creates no context, in a process that has not used CUDA."""
    import torch

    free = nvml_free_bytes(gpus)
    if free is None:
        free = {gpu: torch.cuda.mem_get_info(torch.device(gpu))[0] for gpu in dict.fromkeys(gpus)}
    return {gpu: b + torch.cuda.memory_reserved(torch.device(gpu)) for gpu, b in free.items()}


def check_fits(mem: StageMemory, available: int | None = None, gpus: tuple[str, ...] = (),
               gpu_free: dict[str, int] | None = None, spread: bool = False) -> None:
    """Raise MemoryBudgetError (one line) when the stage's predicted peak exceeds the memory available on any
    device: host parts against `host_available(available)`, each GPU's parts (`gpus`: the GPU of each process,
    see `parts_by_device`; with `spread`, the GPUs a `device_map` spreads the one process's model over, see
    `spread_by_device`) against `gpu_free` (default: `gpu_free_memory`, read only for a GPU run)."""
    spread = spread and bool(gpus)
    needed = spread_by_device(mem, gpus) if spread else parts_by_device(mem, gpus)
    free = {HOST: host_available(available)}
    if gpus:
        free.update(gpu_free_memory(gpus) if gpu_free is None else gpu_free)
    check_fits_per_device(mem, needed, free, spread_over=len(gpus) if spread else 0)


def memory_limit() -> int | None:
    """Return LORALENS_MEMORY_LIMIT in bytes, or None when unset."""
    raw = os.environ.get("LORALENS_MEMORY_LIMIT", "").strip().upper()
    if not raw:
        return None
    scale = {"G": 2**30, "M": 2**20, "K": 2**10}.get(raw[-1], 1)
    try:
        return int(float(raw.rstrip("GMK")) * scale)
    except ValueError:
        raise MemoryBudgetError(f"LORALENS_MEMORY_LIMIT: not a size: {raw!r} (e.g. 8G, 512M)") from None
