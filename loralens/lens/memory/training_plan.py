"""Plan a lens training job before running it: trainable parameters, memory per rank, cache bytes per token.

`plan_memory` is arithmetic on model sizes (no tensors are built), so a plan for Llama-3-8B takes
microseconds; only `load_model_config` reads anything (a config). The estimates model what `LensSet`
(the training objective) and a DeepSpeed engine with AdamW actually allocate; each formula is written out
in the docstring of the function computing it.

Notation: ``L`` trained layers, ``H`` heads, ``dh`` head dim, ``d`` d_model, ``V`` vocab, ``r`` rank,
``T`` tokens per micro-batch, ``c = min(chunk, T)`` tokens per loss chunk, ``k`` target top-k,
``pb`` bytes per trainable parameter, ``N`` world size (data-parallel ranks), ``s`` cache store bytes.

What is NOT counted: allocator caching/fragmentation (on a GPU budget ~10-20 % on top), CUDA context and
kernel workspaces, DeepSpeed's communication buckets (`reduce_bucket_size`, `allgather_bucket_size`;
size them to the model), and the frozen language model itself (training reads the cache, not the model).
"""

from __future__ import annotations

import math

from loralens.lens.lenses.fused_kl import takes_fused
from loralens.lens.lenses.lens_set import LensConfig, trainable_per_head
from loralens.lens.memory.memory_plan import MemoryPlan
from loralens.lens.runtime.adapters import ModelDims

LOSSES = ("subset", "exact")
F32 = 4  # every activation, optimizer state and frozen base tensor of the lens step is float32
INDEX_BYTES = 8  # torch.gather wants int64 indices on the device
CACHE_INT = 4  # the cache stores ids, positions and keys as int32
CACHE_META_COLUMNS = ("shard", "row", "prompt_idx", "position", "token_id", "next_token_id")
CACHE_Z_KEY_COLUMNS = ("shard", "row")  # repeated in every z/layer=* table to join rows back


class PlanError(ValueError):
    """The plan's inputs are inconsistent (e.g. more trained layers than the model has)."""


# -- parameters and training state -------------------------------------------------------------------
def trainable_counts(dims: ModelDims, lens: LensConfig, n_layers: int) -> tuple[int, int, int]:
    """Return trainable scalars ``(per head, per layer, total)``.

    per head = full: ``V d + V``; lora: ``r d + V r + V``; residual: ``2 r d + V`` (bias ``V`` always);
    per layer = ``H * per head``; total = ``L * per layer``.
    """
    per_head = trainable_per_head(lens.form, lens.rank, dims.d_model, dims.vocab)
    return per_head, dims.n_heads * per_head, n_layers * dims.n_heads * per_head


def frozen_bytes(dims: ModelDims, n_layers: int, loss: str) -> tuple[int, int, int]:
    """Return frozen base bytes ``(folded unembedding, W_O, lm_head)``, all float32 as `LensSet` holds them.

    unembed = ``V d 4 + V 4`` (W_fold, b_fold); W_O = ``L H dh d 4`` (trained layers only, cast to fp32);
    lm_head = ``V d 4`` for the exact loss (recomputes the target logits; fp32 model assumed), else 0.
    The full form's per-head weights start as copies of W_fold but are trainable, so they count as parameters.
    """
    unembed = (dims.vocab * dims.d_model + dims.vocab) * F32
    w_o = n_layers * dims.n_heads * dims.d_head * dims.d_model * F32
    lm_head = dims.vocab * dims.d_model * F32 if loss == "exact" else 0
    return unembed, w_o, lm_head


def state_bytes(
    n_params: int, param_bytes: int, world_size: int, zero_stage: int
) -> tuple[int, int, int, int]:
    """Return per-rank ``(parameters, gradients, optimizer states, optimizer-step transient)`` bytes.

    Replicated sizes: parameters ``P pb``; gradients ``P pb``; AdamW states ``P (4 + 4 + m)``: fp32
    ``exp_avg`` and ``exp_avg_sq`` plus an fp32 master copy (``m = 4``) whenever DeepSpeed keeps one:
    under ZeRO >= 1 (it clones the rank's partition to fp32 even for fp32 parameters) or when the
    parameters are not fp32 (mixed precision); a plain torch AdamW on fp32 parameters (stage 0) has ``m = 0``.
    ZeRO divides by ``N``: stage >= 1 the optimizer states, >= 2 the gradients, 3 the parameters.
    Parameters that are not fp32 (bf16: DeepSpeed's mixed precision, ZeRO >= 2 only) also accumulate their
    gradients in fp32 (``data_types.grad_accum_dtype``): the rank's fp32 gradient partition, ``4 P / N`` more.
    Step transient: one fp32 tensor the size of the rank's optimizer partition, ``4 P / N`` (``4 P`` at
    stage 0), for ``sqrt(exp_avg_sq)``: what a foreach AdamW (torch's GPU default) or DeepSpeed's single
    flat partition allocates. (torch's CPU for-loop AdamW needs ~2x its largest tensor instead; fused none.)
    """
    master = F32 if zero_stage >= 1 or param_bytes != F32 else 0
    opt_shards = world_size if zero_stage >= 1 else 1
    params = _ceil_div(n_params * param_bytes, world_size if zero_stage >= 3 else 1)
    grads = _ceil_div(n_params * param_bytes, world_size if zero_stage >= 2 else 1)
    if param_bytes != F32:  # fp32 gradient accumulation beside the low-precision gradients
        grads += _ceil_div(n_params * F32, world_size if zero_stage >= 2 else 1)
    optimizer = _ceil_div(n_params * (2 * F32 + master), opt_shards)
    return params, grads, optimizer, _ceil_div(n_params * F32, opt_shards)


# -- one micro-batch -------------------------------------------------------------------------------
def batch_bytes(dims: ModelDims, n_layers: int, tokens: int, loss: str, top_k: int, store_bytes: int) -> int:
    """Return the bytes of one micro-batch's `LensBatch` on the device.

    ``T (L H dh s + 4 + 1)`` (z, scale, mask) plus, for the subset loss, ``T k (8 + 4)`` (int64 top-k ids,
    fp32 log-probs), for the exact loss ``T d 4`` (fp32 lm_head inputs).
    """
    per_token = n_layers * dims.z_width * store_bytes + F32 + 1
    per_token += top_k * (INDEX_BYTES + F32) if loss == "subset" else dims.d_model * F32
    return tokens * per_token


def chunk_bytes(dims: ModelDims, lens: LensConfig, chunk_tokens: int, loss: str) -> int:
    """Return the peak bytes of one checkpointed loss chunk, forward or backward recompute.

    With ``U = c V 4`` (one fp32 ``[chunk, vocab]`` buffer) and ``O = U`` (joint) or ``H U`` (per_head,
    ``[chunk, heads, vocab]``):

    - subset, backward: ``5 O`` = lens logits and the top-k-masked tail logits (both saved by the
      recompute for logsumexp's backward) + logsumexp backward's ``x - lse``, its ``exp`` and the product.
    - exact, recompute: ``2.25 U + 3 O`` = target log-softmax, its ``exp`` and the ``p > 0`` mask (1 byte,
      hence .25), all ``[c, V]``; lens log-softmax, ``p (logp - logq)`` and the masked product, each ``O``.
    - full form, joint objective, forward: ``(H + 1) U`` (+ ``U`` for the exact target rows): its head sum
      runs over a materialised ``[chunk, heads, vocab]``, larger than the backward for many heads.
    """
    U = chunk_tokens * dims.vocab * F32
    out = U * dims.n_heads if lens.objective == "per_head" else U
    backward = 5 * out if loss == "subset" else (9 * U) // 4 + 3 * out
    forward = 0
    if lens.form == "full" and lens.objective == "joint":
        forward = (dims.n_heads + 1) * U + (U if loss == "exact" else 0)
    return max(backward, forward)


def lowrank_bytes(dims: ModelDims, lens: LensConfig, chunk_tokens: int) -> int:
    """Return the bytes of one chunk's low-rank intermediates (small next to the logits).

    lora: ``A x`` = ``c H r 4``; joint adds the flattened copy of ``lora_B`` ``[V, H r]`` saved by addmm and
    its gradient, ``2 V H r 4``. residual: ``V x`` = ``c H r 4`` plus the moved input ``c d 4`` (joint) or
    ``c H d 4`` (per_head). full: none.
    """
    H, r, c = dims.n_heads, lens.rank, chunk_tokens
    if lens.form == "full":
        return 0
    out = c * H * r * F32
    if lens.form == "lora":
        return out + (2 * dims.vocab * H * r * F32 if lens.objective == "joint" else 0)
    return out + c * dims.d_model * F32 * (H if lens.objective == "per_head" else 1)


def activation_parts(
    dims: ModelDims,
    lens: LensConfig,
    *,
    n_layers: int,
    tokens: int,
    loss: str,
    chunk: int,
    param_bytes: int,
    base_bytes: int = F32,
) -> dict[str, int]:
    """Return the activation terms of one micro-batch's forward + backward and their peak (``total``).

    - ``inputs`` = ``T L H d 4``: every trained layer's per-head lens input ``x`` (fp32), alive from its
      layer's forward until the backward ends (the checkpointed chunks' closures, or ``A x``'s graph, hold it).
    - ``targets`` = ``T V 4`` for the exact loss: the target probabilities, shared by all layers; while they are
      made, ``5.25 T V 4`` (logits, log-softmax, probabilities, the ``p > 0`` mask, ``p log p``) before any layer.
    - checkpointed path (the fused loss: :func:`fused_parts`):
      ``base`` = ``L T V bb`` for lora + joint: each layer's frozen base projection ``W_fold sum_h x_h``,
      computed once outside the checkpointed chunks (``bb`` = 2 for a bf16 base, 4 for fp32) and alive until
      the backward ends.
    - ``chunk`` (see :func:`chunk_bytes`) and ``lowrank`` (see :func:`lowrank_bytes`): one chunk at a time,
      since each chunk is recomputed and released inside its own backward.
    - ``upcast`` = ``H per_head 4`` for 16-bit (bf16) parameters, else 0: a chunk computes with fp32 copies of its
      layer's parameters (:mod:`loralens.lens.lenses.upcast`), made in its forward and again in its recompute,
      one chunk at a time (SmolLM2-135M at r=4: 8.9 MB; Llama-3-8B at r=4: 84 MB).
    - ``grad_accum``: a layer's parameter gradient ``G = H per_head gb`` (``gb = pb``, but 4 for 16-bit
      parameters: their chunk gradients are computed and summed in fp32, rounded to ``pb`` once) comes out of a
      batched matmul in another layout, so accumulating it copies: ``G`` besides the final gradient with one
      chunk; with ``n = ceil(T / chunk) > 1`` chunks autograd sums over the chunks, holding one ``G`` during the
      next chunk's backward (added to ``chunk``) and 3 at the summing instant (buffered, new, sum).
    - forward only: one layer's ``c_h = z_h W_O`` before division and the fp32 ``z``, ``T H (d + dh) 4``.

    total = ``max(target making, inputs + targets + base + max(chunk + lowrank + upcast + G [n > 1], grad_accum,
    T H (d + dh) 4))``. (Only the full form's ``G`` and ``upcast`` are large enough to matter.)
    """
    c = min(chunk, tokens)
    n_chunks = math.ceil(tokens / chunk)
    layer_params = dims.n_heads * trainable_per_head(lens.form, lens.rank, dims.d_model, dims.vocab)
    upcast = layer_params * F32 if param_bytes < F32 else 0
    layer_grad = layer_params * max(param_bytes, F32)
    inputs = tokens * n_layers * dims.n_heads * dims.d_model * F32
    targets = tokens * dims.vocab * F32 if loss == "exact" else 0
    making_targets = (21 * targets) // 4
    forward_inputs = tokens * dims.n_heads * (dims.d_model + dims.d_head) * F32
    if fused_path(dims, lens, tokens, loss, base_bytes):
        return fused_parts(dims, lens, n_layers=n_layers, tokens=tokens, chunk=chunk, base_bytes=base_bytes,
                           inputs=inputs, targets=targets, making_targets=making_targets,
                           forward_inputs=forward_inputs, upcast=upcast, layer_grad=layer_grad)
    base = n_layers * tokens * dims.vocab * base_bytes if (lens.form, lens.objective) == ("lora", "joint") else 0
    chunk_peak = chunk_bytes(dims, lens, c, loss)
    lowrank = lowrank_bytes(dims, lens, c)
    grad_accum = layer_grad if n_chunks == 1 else 3 * layer_grad
    in_chunk = chunk_peak + lowrank + upcast + (layer_grad if n_chunks > 1 else 0)
    total = max(making_targets, inputs + targets + base + max(in_chunk, grad_accum, forward_inputs))
    return {"inputs": inputs, "targets": targets, "base": base, "chunk": chunk_peak, "lowrank": lowrank,
            "upcast": upcast, "grad_accum": grad_accum, "held_grad": 0, "total": total}


def fused_path(dims: ModelDims, lens: LensConfig, tokens: int, loss: str, base_bytes: int) -> bool:
    """Return whether `LensSet` computes this job's loss with `fused_kl` (`takes_fused`)."""
    return takes_fused(lens.form, lens.objective, loss, dims.n_heads, lens.rank, tokens, base_bytes)


def fused_parts(dims: ModelDims, lens: LensConfig, *, n_layers: int, tokens: int, chunk: int, base_bytes: int,
                inputs: int, targets: int, making_targets: int, forward_inputs: int, upcast: int,
                layer_grad: int) -> dict[str, int]:
    """Return the activation terms of the fused lora exact loss (`lens/lenses/fused_kl.py`).

    - ``held_grad`` = ``L (V H r + V n_b + T H r) 4``: each layer's fp32 gradients, from its forward to its
      backward (``n_b`` biases: 1 summed for joint, ``H`` for per_head).
    - ``base`` = ``T V bb``: one layer's frozen base logits, during that layer's forward only (joint); per_head
      makes one head's ``c V 4`` at a time.
    - ``chunk`` = ``c V 4``: the chunk's logits, turned in place into its softmax and gradient.
    - ``lowrank`` = ``V H r 8``: ``lora_B`` flattened and its transpose (fp32), in the layer's forward.
    - ``upcast``: as in :func:`activation_parts`, once per layer's forward.
    - ``grad_accum`` = ``3 G``: a layer's gradient scaled, flattened back and copied into the parameter layout.

    total = ``max(target making, inputs + targets + held_grad + max(base + chunk + lowrank + upcast, grad_accum,
    T H (d + dh) 4))``.
    """
    H, r, V = dims.n_heads, lens.rank, dims.vocab
    per_head = lens.objective == "per_head"
    held = n_layers * (V * H * r + V * (H if per_head else 1) + tokens * H * r) * F32
    base = min(chunk, tokens) * V * F32 if per_head else tokens * V * base_bytes
    chunk_peak = min(chunk, tokens) * V * F32
    lowrank = 2 * V * H * r * F32
    grad_accum = 3 * layer_grad
    total = max(making_targets, inputs + targets + held + max(base + chunk_peak + lowrank + upcast, grad_accum,
                                                               forward_inputs))
    return {"inputs": inputs, "targets": targets, "base": base, "chunk": chunk_peak, "lowrank": lowrank,
            "upcast": upcast, "grad_accum": grad_accum, "held_grad": held, "total": total}


# -- the cache -------------------------------------------------------------------------------------
def cache_bytes_per_token(dims: ModelDims, n_layers: int, top_k: int, store_bytes: int) -> tuple[int, int, int]:
    """Return the cache's uncompressed bytes per token ``(z, target, metadata)``, column by column.

    z = ``L (H dh s + 2 * 4)``: each ``z/layer=*`` table stores z plus int32 keys shard, row.
    target = ``d 4 + k 4 + k 4 + 4 + 4``: h_final fp32, top-k ids int32, top-k log-probs fp32, lse, scale;
    ``d 4 + 4`` when ``k = 0`` (an exact-loss cache stores neither top-k nor lse).
    metadata = ``6 * 4``: shard, row, prompt_idx, position, token_id, next_token_id (int32).
    On disk zstd squeezes the keys to almost nothing; fp16 z barely compresses. Per-prompt rows not counted.
    """
    z = n_layers * (dims.z_width * store_bytes + len(CACHE_Z_KEY_COLUMNS) * CACHE_INT)
    target = dims.d_model * F32 + top_k * (CACHE_INT + F32) + (F32 if top_k else 0) + F32
    return z, target, len(CACHE_META_COLUMNS) * CACHE_INT


# -- the plan --------------------------------------------------------------------------------------
def plan_memory(
    dims: ModelDims,
    lens: LensConfig,
    *,
    micro_batch_tokens: int,
    n_layers_trained: int | None = None,
    top_k: int = 64,
    loss: str = "subset",
    chunk: int = 256,
    param_bytes: int | None = None,
    store_dtype_bytes: int = 2,
    world_size: int = 1,
    zero_stage: int = 2,
    base_dtype: str = "float32",
) -> MemoryPlan:
    """Return the sizes of training ``lens`` on ``n_layers_trained`` layers (default all) of a model ``dims``.

    ``param_bytes`` defaults to the size of ``lens.dtype``; activations are fp32 whatever it is.
    See :func:`state_bytes`, :func:`activation_parts` and :func:`cache_bytes_per_token` for the formulas.
    """
    L = dims.n_layers if n_layers_trained is None else n_layers_trained
    pb = _dtype_bytes(lens) if param_bytes is None else param_bytes
    _validate(dims, L, micro_batch_tokens, top_k, loss, chunk, pb, store_dtype_bytes, world_size, zero_stage)
    per_head, per_layer, total = trainable_counts(dims, lens, L)
    unembed, w_o, lm_head = frozen_bytes(dims, L, loss)
    params, grads, optimizer, step = state_bytes(total, pb, world_size, zero_stage)
    if base_dtype not in ("float32", "bfloat16"):
        raise PlanError(f"base_dtype must be float32 or bfloat16, got {base_dtype!r}")
    base_bytes = 2 if base_dtype == "bfloat16" else F32
    if base_bytes != F32:
        unembed += dims.vocab * dims.d_model * base_bytes  # the bf16 copy of W_fold used for the base GEMM
    act = activation_parts(dims, lens, n_layers=L, tokens=micro_batch_tokens, loss=loss, chunk=chunk,
                           param_bytes=pb, base_bytes=base_bytes)
    z, target, meta = cache_bytes_per_token(dims, L, top_k, store_dtype_bytes)
    return MemoryPlan(
        params_per_head=per_head, params_per_layer=per_layer, params_total=total,
        frozen_unembed_bytes=unembed, frozen_w_o_bytes=w_o, frozen_lm_head_bytes=lm_head,
        param_bytes=params, grad_bytes=grads, optimizer_bytes=optimizer, step_transient_bytes=step,
        batch_bytes=batch_bytes(dims, L, micro_batch_tokens, loss, top_k, store_dtype_bytes),
        act_inputs_bytes=act["inputs"], act_targets_bytes=act["targets"], act_base_bytes=act["base"],
        act_chunk_bytes=act["chunk"],
        act_lowrank_bytes=act["lowrank"], act_upcast_bytes=act["upcast"], act_grad_accum_bytes=act["grad_accum"],
        act_held_grad_bytes=act["held_grad"], activation_bytes=act["total"],
        cache_z_bytes_per_token=z, cache_target_bytes_per_token=target, cache_meta_bytes_per_token=meta,
    )


def _dtype_bytes(lens: LensConfig) -> int:
    """Return the element size of the lens parameter dtype."""
    return lens.torch_dtype.itemsize


def _ceil_div(a: int, b: int) -> int:
    """Return ``ceil(a / b)`` for non-negative ints (a ZeRO partition is padded, never short)."""
    return -(-a // b)


def _validate(
    dims: ModelDims, n_layers: int, tokens: int, top_k: int, loss: str, chunk: int, param_bytes: int,
    store_bytes: int, world_size: int, zero_stage: int,
) -> None:
    """Raise PlanError naming the first inconsistent input."""
    checks = [
        (loss in LOSSES, f"loss must be one of {LOSSES}, got {loss!r}"),
        (1 <= n_layers <= dims.n_layers, f"layers trained must be in [1, {dims.n_layers}], got {n_layers}"),
        (tokens >= 1, f"micro-batch tokens must be >= 1, got {tokens}"),
        (0 <= top_k <= dims.vocab, f"top-k must be in [0, {dims.vocab}], got {top_k}"),
        (top_k >= 1 or loss != "subset", "top-k must be >= 1 for the subset loss"),
        (chunk >= 1, f"chunk must be >= 1, got {chunk}"),
        (param_bytes in (2, 4, 8), f"param bytes must be 2, 4 or 8, got {param_bytes}"),
        (store_bytes in (2, 4), f"store dtype bytes must be 2 or 4, got {store_bytes}"),
        (world_size >= 1, f"world size must be >= 1, got {world_size}"),
        (zero_stage in (0, 1, 2, 3), f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage}"),
        (param_bytes != 2 or zero_stage >= 2, f"bf16 lens parameters need ZeRO stage 2 or 3 (fp32 gradient "
         f"accumulation), got {zero_stage}"),
    ]
    for ok, message in checks:
        if not ok:
            raise PlanError(message)
