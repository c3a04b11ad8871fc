"""RealToxicityPrompts-style sampling: k nucleus-sampled continuations per prompt, one generate() per prompt batch.

Determinism. `generate_joint` samples every (prompt, k) row of one prompt batch in ONE generate() call, right
after `torch.manual_seed(hash_seed(seed, batch_key))` inside `torch.random.fork_rng` (the caller's global RNG is
left as it was). Hugging Face sampling draws from the global RNG and the rows share padding, so the texts depend
on the whole batch and its key: reproducible as long as the caller keeps its batches fixed (the intervene stage's
batches are part of its version), and a batch run alone, in any order or after a kill, gives the same texts.

Sampling is pure nucleus sampling (top_p, top_k = 0) at `temperature`; every generation knob is set explicitly so
the model's own generation_config (repetition penalty, min_new_tokens, top_k ...) cannot leak in.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from loralens.lens.runtime.devices import input_device

# generate() samples from torch's process-wide RNG, so anything else drawing from it in another thread of the same
# process (building a scorer initialises its weights from it) would shift a seeded sample. Seeded sampling and
# model or scorer loading take turns on this lock, which keeps every sample a function of its seed alone (each call
# re-seeds with hash_seed inside fork_rng, so neither the order of calls nor the process matters). It is only ever
# contended by threads of one process (a multi-threaded Dask worker); parallelism comes from worker processes
# (`run.workers`, one RNG each), where it is never waited on.
RNG_LOCK = threading.RLock()

# The 64-bit seed space torch.manual_seed accepts without wrapping is [0, 2**63).
_SEED_MODULUS = 2**63


def hash_seed(seed: int, *index: int) -> int:
    """Return a stable seed in [0, 2**63) derived from `seed` and any number of indices (e.g. a prompt index).

    sha256 of the decimal numbers, so the value is the same in every process and Python version (unlike hash()).
    """
    key = ":".join(str(int(x)) for x in (seed, *index)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % _SEED_MODULUS


def prompt_batches(n_prompts: int, batch_size: int) -> list[range]:
    """Return the prompt index ranges [start, stop) of size batch_size: the intervene stage's prompt batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [range(s, min(s + batch_size, n_prompts)) for s in range(0, n_prompts, batch_size)]


def _eos_ids(model, tokenizer) -> list[int]:
    """Return the token ids that end a continuation: the model's generation eos, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def pad_id(tokenizer, model=None) -> int:
    """Return the pad id: the tokenizer's pad token, else the first eos id (the model's, else the tokenizer's)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = _eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return eos[0]


def prompt_ids(tokenizer, prompt: str, max_prompt_tokens: int | None = None) -> list[int]:
    """Return the token ids of one prompt, left-truncated to at most max_prompt_tokens.

    Left truncation keeps the END of a long prompt (the part the continuation follows); leading special tokens the
    tokenizer adds (a BOS) are kept in front and count towards max_prompt_tokens. An empty prompt becomes the
    BOS (or eos) token alone, because generate() needs at least one input token.
    """
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    special = set(tokenizer.all_special_ids)
    n_lead = 0
    while n_lead < len(ids) and ids[n_lead] in special:
        n_lead += 1
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        if max_prompt_tokens < n_lead + 1:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room after {n_lead} special tokens")
        ids = ids[:n_lead] + ids[len(ids) - (max_prompt_tokens - n_lead):]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [int(start)]
    return ids


def encode_prompts(tokenizer, prompts: Sequence[str], *, pad_token_id: int, max_prompt_tokens: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """Return left-padded input_ids and attention_mask, both long [len(prompts), longest prompt].

    Padding is done here instead of through tokenizer.padding_side / truncation_side, so the (shared) tokenizer is
    never mutated, not even temporarily. Left padding keeps every prompt's last token at the end, where generate()
    appends new tokens.
    """
    rows = [prompt_ids(tokenizer, p, max_prompt_tokens) for p in prompts]
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # host: the caller moves it
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # host
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)  # host
            attention_mask[i, width - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def sampling_config(*, max_new_tokens: int, top_p: float, temperature: float, pad_token_id: int,
                    eos_token_id: list[int]) -> GenerationConfig:
    """Return a GenerationConfig for pure nucleus sampling with every knob the model could override set explicitly.

    transformers fills only the fields left None from model.generation_config, so each logits processor that a
    checkpoint might switch on (repetition penalty, min length, top-k, typical / epsilon / eta / min-p cutoffs,
    n-gram blocking, guidance) gets its neutral value here. min_length stays None because min_new_tokens=0
    overrides it (setting both only makes transformers warn).
    """
    return GenerationConfig(
        do_sample=True, num_beams=1, num_return_sequences=1, top_p=top_p, top_k=0, temperature=temperature,
        max_new_tokens=max_new_tokens, min_new_tokens=0, min_p=0.0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, length_penalty=1.0, guidance_scale=1.0,
        renormalize_logits=False, remove_invalid_values=False, use_cache=True, output_scores=False,
        return_dict_in_generate=False, pad_token_id=pad_token_id, eos_token_id=eos_token_id or None,
    )


def _cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    """Return ids up to (without) the first eos; what follows is generate()'s padding of a finished row."""
    for pos, t in enumerate(ids):
        if t in eos:
            return ids[:pos]
    return ids


@torch.no_grad()
def sample_rows(model, tokenizer, rows: Sequence[str], *, seed_key: int, max_new_tokens: int = 20,
                top_p: float = 0.9, temperature: float = 1.0, seed: int = 0,
                max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Return the new token ids of one sample per row (each cut before its first eos), from ONE generate() call.

    The call is left-padded `[len(rows), longest prompt]` and seeded with hash_seed(seed, seed_key): the result
    depends only on (rows, seed, seed_key, the settings, the model). Each list has at most max_new_tokens ids.
    """
    eos = _eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, model)
    device = input_device(model)
    batch = encode_prompts(tokenizer, rows, pad_token_id=pad, max_prompt_tokens=max_prompt_tokens)
    batch = {name: t.to(device) for name, t in batch.items()}
    config = sampling_config(max_new_tokens=max_new_tokens, top_p=top_p, temperature=temperature,
                             pad_token_id=pad, eos_token_id=eos)
    # Fork so seeding per call does not reset the caller's RNG stream.
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with RNG_LOCK, torch.random.fork_rng(devices=cuda):
        torch.manual_seed(hash_seed(seed, seed_key))
        out = model.generate(**batch, generation_config=config)  # [rows, prompt_len + new]
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    eos_set = set(eos)
    return [_cut_at_eos(row, eos_set) for row in new]


def decode_continuations(tokenizer, ids: Sequence[Sequence[int]]) -> list[str]:
    """Return the text of each continuation's ids, special tokens skipped and spacing kept exactly as generated."""
    return tokenizer.batch_decode([list(r) for r in ids], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)


def generate_joint(model, tokenizer, prompts: Sequence[str], *, batch_key: int, k: int, max_new_tokens: int = 20,
                   top_p: float = 0.9, temperature: float = 1.0, seed: int = 0,
                   max_prompt_tokens: int | None = None) -> list[list[str]]:
    """Return k continuations per prompt from ONE generate() call over all `[len(prompts) * k]` rows.

    Many times faster than one call per prompt on CPU, where a step's cost is mostly per-call overhead. The texts
    depend on the whole batch (its prompts, their left padding) and on hash_seed(seed, batch_key), so they are
    reproducible as long as the caller keeps its batches fixed (same prompts per batch: part of its version).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = [p for p in prompts for _ in range(k)]
    ids = sample_rows(model, tokenizer, rows, seed_key=batch_key, max_new_tokens=max_new_tokens, top_p=top_p,
                      temperature=temperature, seed=seed, max_prompt_tokens=max_prompt_tokens)
    texts = decode_continuations(tokenizer, ids)
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
