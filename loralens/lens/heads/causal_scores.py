"""Cheap causal head scores, without sampling: what removing a head does to a teacher-forced toxicity proxy.

The proxy. Each prompt is followed by a human continuation (teacher forcing); at every position that predicts a
continuation token the model's next-token distribution p is read, and J = mean over those positions of
sum_v p(v) * tox(v), the expected token toxicity (`expected_toxicity_proxy`). This is the very quantity sampling
draws from: a sampled continuation's toxic tokens come from these distributions, so lowering J lowers what
sampling would produce, but J needs one forward pass instead of many samples, has no sampling noise, is linear in
p (so its per-head changes add up and its gradient is meaningful) and is defined for every prompt, also ones
whose sampled continuations happen to contain no toxic token.

Two scores of the same quantity, per head h and per sequence: the effect J(ablated) - J(ablated + {h}) of
zero-ablating h on top of a reference set (positive = the head pushes toward toxicity):

    ablation_effects      exact: one forward pass per head per batch (zero ablation through `interventions.ablate`).
    attribution_patching  first order (activation x gradient): effect_h ~ sum over positions of z_h . dJ/dz_h, for
                          every head of the given layers from one forward and one backward pass per batch.

Every model pass runs under whatever hooks are active on the model, so `with ablate(...)` or `intervene(...)`
around a call changes the model being scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from loralens.lens.heads.edits import ablate
from loralens.lens.heads.head_scores import expected_toxicity
from loralens.lens.heads.head_sets import Head
from loralens.lens.heads.hooks import split_heads
from loralens.lens.runtime.adapters import ArchAdapter, ModelDims, model_dims
from loralens.lens.runtime.devices import input_device
from loralens.lens.runtime.tokens import pad_id, prompt_ids

# (logits [batch, pos, vocab], scored [batch, pos] bool: positions whose next-token distribution counts)
#   -> [batch], one value per sequence. Must be differentiable in logits for attribution_patching.
Proxy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields make field-wise equality meaningless
class ForcedBatch:
    """One teacher-forced batch, right-padded: prompt ids then continuation ids per row."""

    input_ids: torch.Tensor  # [batch, pos] long
    attention_mask: torch.Tensor  # [batch, pos] long: 1 on real tokens, 0 on pads
    scored: torch.Tensor  # [batch, pos] bool: the positions that predict continuation tokens


def forced_row(tokenizer, prompt: str, continuation: str, *, max_prompt_tokens: int,
               max_continuation_tokens: int) -> tuple[list[int], range]:
    """Return (prompt + continuation ids, the scored positions) of one teacher-forced row.

    The prompt is tokenized with special tokens and left-truncated keeping its end (a leading BOS is kept; an
    empty prompt is the BOS alone: `generation.prompt_ids`, as sampling sees it); the continuation without special
    tokens, truncated to `max_continuation_tokens`. Scored: the last prompt position and every continuation
    position but the last, i.e. the positions whose next token is a continuation token; with an empty
    continuation, the last prompt position alone.
    """
    p = prompt_ids(tokenizer, prompt, max_prompt_tokens)
    c = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])[:max_continuation_tokens]
    return p + c, range(len(p) - 1, len(p) - 1 + max(len(c), 1))


def teacher_forced_batches(tokenizer, prompts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 8,
                           max_prompt_tokens: int = 64, max_continuation_tokens: int = 32) -> list[ForcedBatch]:
    """Return right-padded ForcedBatches of prompt + continuation rows, in order (see `forced_row`).

    Each batch is `[min(batch_size, rows left), longest row in it]`; pads (the pad id, else eos) have attention
    mask 0 and are never scored. Tensors are on the host; the scoring functions move them to the model.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"continuations: {len(continuations)} given for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_continuation_tokens < 0:
        raise ValueError(f"max_continuation_tokens must be >= 0, got {max_continuation_tokens}")
    pad = pad_id(tokenizer)
    limits = dict(max_prompt_tokens=max_prompt_tokens, max_continuation_tokens=max_continuation_tokens)
    rows = [forced_row(tokenizer, p, c, **limits) for p, c in zip(prompts, continuations, strict=True)]
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # host: the caller moves it
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # host
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)  # host
        for i, (ids, positions) in enumerate(chunk):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)  # host
            attention_mask[i, :len(ids)] = 1
            scored[i, positions.start:positions.stop] = True
        batches.append(ForcedBatch(input_ids=input_ids, attention_mask=attention_mask, scored=scored))
    return batches


def expected_toxicity_proxy(token_tox: torch.Tensor) -> Proxy:
    """Return the proxy: per sequence, the mean over scored positions of sum_v softmax(logits)_v * token_tox_v.

    `token_tox` `[vocab]` in [0, 1]. Computed in fp32. Logits with more columns than `token_tox` (an embedding
    padded past the tokenizer's vocabulary) keep those columns in the softmax, with toxicity 0; fewer columns
    raise ValueError. A sequence with no scored position gets 0.
    """
    tox = token_tox.detach().float()

    def proxy(logits: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        extra = logits.shape[-1] - tox.shape[0]
        if extra < 0:
            raise ValueError(f"token_tox: {tox.shape[0]} entries but the logits have only {logits.shape[-1]} columns")
        t = nn.functional.pad(tox.to(logits.device), (0, extra))  # [vocab]
        per_pos = expected_toxicity(logits, t)  # [batch, pos] fp32
        mask = scored.to(per_pos.device).float()
        return (per_pos * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)

    return proxy


def _forward_proxy(model: nn.Module, batch: ForcedBatch, proxy: Proxy) -> torch.Tensor:
    """Return the proxy `[batch]` of one forward pass over `batch` (moved to the model's input device)."""
    device = input_device(model)
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    return proxy(out.logits, batch.scored.to(out.logits.device))


def proxy_values(model: nn.Module, batches: Sequence[ForcedBatch], proxy: Proxy) -> np.ndarray:
    """Return the proxy of every sequence of `batches`, `[n_sequences]` float64, under the model's active hooks."""
    values = []
    with torch.no_grad():
        for batch in batches:
            values.append(_forward_proxy(model, batch, proxy).double().cpu().numpy())
    return np.concatenate(values) if values else np.zeros(0)


def _heads(heads: Sequence[Head]) -> list[Head]:
    """Return `heads` as (int, int) tuples, duplicates dropped, order kept."""
    return list(dict.fromkeys((int(layer), int(head)) for layer, head in heads))


def ablation_effects(model: nn.Module, adapter: ArchAdapter, batches: Sequence[ForcedBatch], candidates: Sequence[Head],
                     proxy: Proxy, *, ablated: Sequence[Head] = (), dims: ModelDims | None = None,
                     progress: bool = True) -> dict[Head, np.ndarray]:
    """Return, per candidate head h not in `ablated`, J(ablated) - J(ablated + {h}) `[n_sequences]` float64.

    Zero ablation. Positive: removing h lowers the proxy (h pushes toward toxicity). Per batch: one forward pass
    for the reference set `ablated`, which records every decoder layer's output, then one pass per head that runs
    only the layers from the head's own onward: the layers before it cannot see the edit, so they replay their
    recorded outputs (`_replaying`). That halves the work on average and changes no number (tested against full
    passes).
    """
    from tqdm.auto import tqdm

    dims = dims or model_dims(model.config)
    ablated = _heads(ablated)
    skip = set(ablated)
    todo = [h for h in _heads(candidates) if h not in skip]
    per_batch: dict[Head, list[np.ndarray]] = {h: [] for h in todo}
    bar = tqdm(total=len(todo) * len(batches), desc="ablation effects", unit="head", disable=not progress)
    with torch.no_grad(), bar:
        for batch in batches:
            with ablate(model, ablated, "zero", adapter=adapter, dims=dims), _recording(model, adapter) as outputs:
                reference = _forward_proxy(model, batch, proxy).double().cpu().numpy()
            for head in todo:
                with (ablate(model, [*ablated, head], "zero", adapter=adapter, dims=dims),
                      _replaying(model, adapter, outputs, head[0])):
                    per_batch[head].append(reference - _forward_proxy(model, batch, proxy).double().cpu().numpy())
                bar.update(1)
    return {h: np.concatenate(v) if v else np.zeros(0) for h, v in per_batch.items()}


@contextmanager
def _recording(model: nn.Module, adapter: ArchAdapter) -> Iterator[dict[int, object]]:
    """Yield {layer: that decoder layer's output object} filled by the next forward pass (hooks removed on exit)."""
    outputs: dict[int, object] = {}
    handles = [layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
               for i, layer in enumerate(adapter.layers(model))]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _replaying(model: nn.Module, adapter: ArchAdapter, outputs: dict[int, object], upto: int) -> Iterator[None]:
    """Make decoder layers [0, upto) return their recorded `outputs` instead of computing (an instance `forward`
    shadowing the class's; every attribute the model's loop reads on a layer stays as it was)."""
    layers = list(adapter.layers(model))[:upto]
    # An instance `forward` already there (accelerate's device-placement wrapper under a `device_map`) is put back.
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.forward = lambda *_a, _out=outputs[i], **_k: _out
        yield
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward


def attribution_patching(model: nn.Module, adapter: ArchAdapter, batches: Sequence[ForcedBatch], layers: Sequence[int],
                         proxy: Proxy, *, ablated: Sequence[Head] = (), dims: ModelDims | None = None
                         ) -> dict[Head, np.ndarray]:
    """Return the first-order estimate of `ablation_effects` for every head of `layers` not in `ablated`.

    effect_h ~ J(ablated) - J(ablated + {h}) ~ -(dJ/dz_h) . (0 - z_h) = sum over real positions of z_h . dJ/dz_h,
    `[n_sequences]` float64, from one forward and one backward pass per batch (with `ablated` zeroed). dJ/dz is
    the total derivative through every later layer: a zero `delta` `[batch, pos, heads*d_head]` is added to z in a
    pre-hook on each output projection (after any edit hooks already there) and J is differentiated w.r.t. the
    deltas alone, so the model's parameters are frozen meanwhile (their flags restored) and their grads untouched.
    Products are taken in fp32, so bf16 models work.
    """
    dims = dims or model_dims(model.config)
    layers = list(dict.fromkeys(int(layer) for layer in layers))
    for layer in layers:
        if not 0 <= layer < dims.n_layers:
            raise ValueError(f"layers: layer {layer} out of range [0, {dims.n_layers})")
    ablated = _heads(ablated)
    sums: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}  # per batch: [batch, heads]
    with frozen_parameters(model), ablate(model, ablated, "zero", adapter=adapter, dims=dims), torch.enable_grad():
        for batch in batches:
            for layer, effect in _batch_attribution(model, adapter, dims, batch, layers, proxy).items():
                sums[layer].append(effect)
    out: dict[Head, np.ndarray] = {}
    skip = set(ablated)
    for layer in layers:
        per_seq = np.concatenate(sums[layer]) if sums[layer] else np.zeros((0, dims.n_heads))  # [n_seq, heads]
        for h in range(dims.n_heads):
            if (layer, h) not in skip:
                out[(layer, h)] = per_seq[:, h].copy()
    return out


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off every parameter's requires_grad inside the block (flags restored on exit; grads untouched)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _batch_attribution(model: nn.Module, adapter: ArchAdapter, dims: ModelDims, batch: ForcedBatch,
                       layers: list[int], proxy: Proxy) -> dict[int, np.ndarray]:
    """Return per layer `[batch, heads]` float64: sum over real positions of z_h . dJ/dz_h for one batch."""
    out = {}
    for layer, (z, grad) in batch_head_grads(model, adapter, batch, layers, forced_objective(proxy)).items():
        prod = (split_heads(z, dims.n_heads).float() * split_heads(grad, dims.n_heads).float()).sum(-1)
        real = batch.attention_mask.to(prod.device).float()  # [batch, pos]
        out[layer] = (prod * real[..., None]).sum(1).double().cpu().numpy()  # [batch, heads]
    return out


# (logits [batch, pos, vocab], the batch) -> [batch]: what a gradient is taken of (differentiable in logits)
Objective = Callable[[torch.Tensor, ForcedBatch], torch.Tensor]


def forced_objective(proxy: Proxy) -> Objective:
    """Return `proxy` as an Objective: evaluated at the batch's scored positions."""
    return lambda logits, batch: proxy(logits, batch.scored.to(logits.device))


def batch_head_grads(model: nn.Module, adapter: ArchAdapter, batch: ForcedBatch, layers: list[int],
                     objective: Objective) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Return per layer (z, dJ/dz), each `[batch, pos, heads*d_head]`, from one forward and one backward pass.

    dJ/dz is the total derivative of `sum(objective)` through every later layer: a zero `delta` is added to z in a
    pre-hook on each output projection (after any edit hooks already there) and J is differentiated w.r.t. the
    deltas alone. Call with the model's parameters frozen and grad enabled (`attribution_patching` does).
    """
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (z detached, delta leaf)

    def hook_for(layer: int):
        def hook(_module, args):
            z = args[0]
            delta = torch.zeros_like(z, requires_grad=True)
            seen[layer] = (z.detach(), delta)
            return (z + delta, *args[1:])

        return hook

    handles = [adapter.out_proj(model, layer).register_forward_pre_hook(hook_for(layer)) for layer in layers]
    device = input_device(model)
    try:
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    use_cache=False)
        j = objective(out.logits, batch)  # [batch]
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(j.sum(), [seen[layer][1] for layer in layers], allow_unused=True)
    return {layer: (seen[layer][0], torch.zeros_like(seen[layer][1]) if grad is None else grad)
            for layer, grad in zip(layers, grads, strict=True)}
