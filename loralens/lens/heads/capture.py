"""The math of the `cache` stage: run the frozen model over prompts and extract per-token arrays.

Per real (non-padding) token we keep every cached layer's output-projection input `z` (stored in
fp16/bf16), and the target: the final normed hidden state in fp32 (the lm_head input, so the model's
logits are recomputed exactly with the frozen unembedding), the final norm's divisor (so per-head
contributions are read on the same scale as the final logits), and a top-k summary of the target
distribution (ids, log-probs, log-sum-exp) for subset losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from loralens.lens.heads.hooks import capture
from loralens.lens.runtime.adapters import norm_scale
from loralens.lens.runtime.devices import input_device, rows_of
from loralens.lens.runtime.models import LoadedModel, model_context_length


@dataclass
class TokenizedPrompts:
    """Token ids per prompt after truncation, with how many were truncated."""

    ids: list[list[int]]
    truncated: list[bool]

    @property
    def n_truncated(self) -> int:
        """Return how many prompts were cut to the length limit."""
        return sum(self.truncated)

    @property
    def n_empty(self) -> int:
        """Return how many prompts have no tokens at all."""
        return sum(not x for x in self.ids)


def tokenize_prompts(tokenizer, texts: Sequence[str], max_length: int) -> TokenizedPrompts:
    """Return token ids per prompt, truncated to `max_length`; prompts with no tokens stay empty lists."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return TokenizedPrompts(ids=[x[:max_length] for x in ids], truncated=[len(x) > max_length for x in ids])


CHARS_PER_TOKEN_READ = 10  # characters tokenized per wanted token: ~2.5x margin over English text's ~4


def text_windows(tokenizer, text: str, max_length: int, max_tokens: int) -> list[list[int]]:
    """Return the first `max_tokens` tokens of `text` as windows of at most `max_length` tokens.

    Each window starts with the tokenizer's own prefix (BOS for Llama, none for GPT-2), as a prompt would; windows
    shorter than two tokens are dropped (no next token to read).
    """
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    body = max_length - len(prefix)
    if body < 1:
        raise ValueError(f"max_length {max_length} leaves no room after the tokenizer's {len(prefix)} prefix tokens")
    head = text[: max_tokens * CHARS_PER_TOKEN_READ]  # tokenizing a whole corpus for a few windows is wasted work
    ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    if len(ids) < max_tokens and len(head) < len(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows, total = [], 0
    for start in range(0, len(ids), body):
        window = (prefix + ids[start:start + body])[: max_tokens - total]
        if len(window) < 2:
            break
        windows.append(window)
        total += len(window)
    return windows


def effective_max_length(loaded: LoadedModel, requested: int) -> int:
    """Return the requested prompt length capped by the model's context."""
    return min(requested, model_context_length(loaded.model.config))


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return right-padded input ids and attention mask, both `[batch, pos]`, on the host (callers move them)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # host: built from Python lists
    mask = torch.zeros((len(ids), width), dtype=torch.long)  # host
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)  # host
        mask[i, : len(x)] = 1
    return input_ids, mask


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Return x as a uint16 numpy array holding fp16/bf16 bit patterns (numpy has no bf16)."""
    return x.to(getattr(torch, dtype)).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def from_storage(bits: np.ndarray, dtype: str) -> torch.Tensor:
    """Return the fp16/bf16 tensor whose bit patterns are in the uint16 array `bits`."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(getattr(torch, dtype))


@dataclass
class TokenArrays:
    """Per-token arrays of one batch or shard, rows in (prompt, position) order; `n` rows."""

    prompt_idx: np.ndarray  # [n] int32, index into the corpus
    position: np.ndarray  # [n] int32
    token_id: np.ndarray  # [n] int32
    next_token_id: np.ndarray  # [n] int32, -1 at a prompt's last token
    h_final: np.ndarray  # [n, d_model] float32, lm_head input
    scale: np.ndarray  # [n] float32, final norm divisor of the pre-norm residual
    # The target's top-k and log-sum-exp: only for a subset loss (top_k = 0: None, and never computed).
    topk_ids: np.ndarray | None  # [n, k] int32
    topk_logprobs: np.ndarray | None  # [n, k] float32
    lse: np.ndarray | None  # [n] float32, log-sum-exp of the target logits
    z: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [n, heads*d_head] uint16 bits

    @property
    def n(self) -> int:
        """Return the number of token rows."""
        return len(self.token_id)

    @staticmethod
    def concat(parts: Sequence[TokenArrays]) -> TokenArrays:
        """Return the row-wise concatenation of several batches."""
        cat = {k: None if getattr(parts[0], k) is None else np.concatenate([getattr(p, k) for p in parts])
               for k in _ROW_FIELDS}
        z = {layer: np.concatenate([p.z[layer] for p in parts]) for layer in parts[0].z}
        return TokenArrays(**cat, z=z)


_ROW_FIELDS = ("prompt_idx", "position", "token_id", "next_token_id", "h_final", "scale", "topk_ids",
               "topk_logprobs", "lse")


@torch.no_grad()
def cache_batch(
    loaded: LoadedModel,
    ids: Sequence[Sequence[int]],
    prompt_idx: Sequence[int],
    layers: Sequence[int],
    *,
    top_k: int,
    store_dtype: str,
) -> TokenArrays:
    """Run one batch of tokenized prompts through the frozen model and return its per-token arrays.

    Inputs go to the model's device; every output comes back to the host (numpy) once, per batch.
    """
    model, adapter = loaded.model, loaded.adapter
    input_ids, mask = pad_batch(ids, loaded.tokenizer.pad_token_id)  # host
    device = input_device(model)
    with capture(model, adapter, layers) as cap:
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    real = mask.bool()  # host; moved to each tensor's device by rows_of
    resid = rows_of(cap.final_resid, real)  # [n, d_model]
    h_final = adapter.final_norm(model)(resid).float()
    top = target_top_k(logits, real, top_k) if top_k else None
    lengths = mask.sum(1)
    next_ids = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -1)], dim=1)
    next_ids[torch.arange(len(ids)), lengths - 1] = -1  # host
    return TokenArrays(
        prompt_idx=np.repeat(np.asarray(prompt_idx, dtype=np.int32), lengths.numpy()),  # host
        position=torch.arange(input_ids.shape[1]).expand_as(input_ids)[real].numpy().astype(np.int32),  # host
        token_id=input_ids[real].numpy().astype(np.int32),  # host
        next_token_id=next_ids[real].numpy().astype(np.int32),  # host
        h_final=h_final.cpu().numpy(),
        scale=norm_scale(adapter, model, resid).squeeze(-1).cpu().numpy(),
        topk_ids=None if top is None else top[0],
        topk_logprobs=None if top is None else top[1],
        lse=None if top is None else top[2],
        z={layer: to_storage(rows_of(cap.z[layer], real), store_dtype) for layer in layers},
    )


def target_top_k(logits: torch.Tensor, real: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the real rows' top-k ids `[n, k]`, their log-probs and the log-sum-exp `[n]` of `[B, T, V]` logits.

    Reduces over the vocabulary on the padded logits, then keeps real rows: indexing first would copy the
    largest tensor of the pass. A full-vocabulary pass: the cache computes it only for a subset loss.
    """
    lse = rows_of(torch.logsumexp(logits, dim=-1), real).float()
    top_vals, top_ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    top_vals, top_ids = rows_of(top_vals, real).float(), rows_of(top_ids, real)
    return (top_ids.cpu().numpy().astype(np.int32), (top_vals - lse[:, None]).cpu().numpy(),
            lse.cpu().numpy())


def target_logits(loaded: LoadedModel, h_final: torch.Tensor) -> torch.Tensor:
    """Return the model's exact final logits `[n, vocab]` from cached lm_head inputs `[n, d_model]`."""
    unembed = loaded.model.get_output_embeddings()
    return unembed(h_final.to(unembed.weight.dtype)).float()
