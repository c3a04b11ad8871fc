"""Token ids of prompts: pad and end-of-sequence ids, left-truncated prompt ids, left-padded prompt batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def eos_ids(model, tokenizer) -> list[int]:
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
    eos = eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return eos[0]


def prompt_ids(tokenizer, prompt: str, max_prompt_tokens: int | None = None) -> list[int]:
    """Return the token ids of one prompt, left-truncated to at most max_prompt_tokens.

    Left truncation keeps the END of a long prompt (the part the continuation follows); leading special tokens the
    tokenizer adds (a BOS) are kept in front and count towards max_prompt_tokens. An empty prompt becomes the
    BOS (or eos) token alone, because sampling needs at least one input token.
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
    never mutated, not even temporarily. Left padding keeps every prompt's last token at the end, where sampling
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
