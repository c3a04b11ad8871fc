"""Windowed perplexity of a causal LM on a text, under whatever forward hooks are set (interventions apply)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loralens.lens.runtime.devices import input_device


def _windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Return (start, stop, first_scored) per window: tokens [start, stop) go in, targets at >= first_scored count.

    A target at position t is predicted from tokens before it, so a window's first token is never scored. With
    stride < window the windows overlap and only targets past the previous window's stop are scored, so each
    token counts once and gets window - stride tokens of extra context.
    """
    out = []
    prev_stop = 0
    for start in range(0, n_tokens, stride):
        stop = min(start + window, n_tokens)
        first = max(start + 1, prev_stop)
        if first < stop:
            out.append((start, stop, first))
        prev_stop = stop
        if stop == n_tokens:
            break
    return out


@torch.no_grad()
def _window_nll(model, ids: torch.Tensor, spans: list[tuple[int, int, int]], pad_id: int,
                device: torch.device) -> tuple[float, int]:
    """Return (summed NLL, scored tokens) of a batch of windows of the 1-D token tensor ids.

    Windows are right-padded (a causal model's real positions never see later pads) and pads are masked both in
    attention_mask and out of the loss. The loss is computed here in fp32 from the logits, so forward hooks on
    the model (interventions) apply.
    """
    width = max(stop - start for start, stop, _ in spans)
    input_ids = torch.full((len(spans), width), pad_id, dtype=torch.long)  # host: moved below
    attention_mask = torch.zeros((len(spans), width), dtype=torch.long)  # host
    scored = torch.zeros((len(spans), width), dtype=torch.bool)  # host: [B, T] target at this position counts
    for row, (start, stop, first) in enumerate(spans):
        input_ids[row, :stop - start] = ids[start:stop]
        attention_mask[row, :stop - start] = 1
        scored[row, first - start:stop - start] = True
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # [B, T, V]
    shifted = logits[:, :-1].float()  # [B, T-1, V]: position t predicts token t + 1
    targets = input_ids[:, 1:].to(logits.device)  # [B, T-1] (under a device_map the logits are on the last GPU)
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                          reduction="none").view(targets.shape)  # [B, T-1]
    mask = scored[:, 1:].to(logits.device)
    return float(nll[mask].double().sum()), int(mask.sum())


def perplexity(model, tokenizer, text: str, *, max_tokens: int, window: int = 256, stride: int | None = None,
               batch_size: int = 8, progress: bool = False) -> dict[str, float | int]:
    """Return {"ppl", "nll", "nll_sum", "tokens"} of the model on the first max_tokens tokens of text.

    The text is tokenized once without special tokens (no BOS), so every window is alike. Tokens are cut into
    windows of `window` tokens starting every `stride` tokens (default stride = window: non-overlapping windows,
    whose first token is not predicted); windows run in batches of batch_size. nll is the mean NLL (nats) per
    predicted token, nll_sum their sum, tokens their count, ppl = exp(nll). Runs a plain forward pass, so every
    hook registered on the model applies.
    """
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens],  # host: windows move
                       dtype=torch.long)
    spans = _windows(len(ids), window, stride)
    if not spans:
        raise ValueError(f"text has {len(ids)} tokens: too few to predict any")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else int(pad_id)  # pads are masked out, any valid id will do
    device = input_device(model)
    starts = range(0, len(spans), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    total, count = 0.0, 0
    for s in starts:
        nll, n = _window_nll(model, ids, spans[s:s + batch_size], pad_id, device)
        total, count = total + nll, count + n
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "nll_sum": total, "tokens": count}


__all__ = ["perplexity"]
