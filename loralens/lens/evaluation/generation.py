"""RealToxicityPrompts-style sampling: k nucleus-sampled continuations per prompt, one batched forward per step.

Determinism. Each continuation has its own seed, `sample_seed(seed, prompt text, sample index)`, and its own
`torch.Generator`: a row's draws never depend on the other rows of its batch, so the same prompt's k samples are the
same texts whatever the batch size, the batch's other prompts, the order of batches or the worker that runs them
(up to the float rounding of a batched, left-padded forward, which moves a draw only on a tie at a probability
boundary). The sampling loop is our own (`sample_rows`: KV cache, one forward of every row per step): Hugging Face
`generate()` draws from torch's one global RNG, which would tie each row to its batch. torch's global RNG is never
touched.

Sampling is pure nucleus sampling (top_p, no top-k) at `temperature`; the model's own generation_config
(repetition penalty, min_new_tokens, top_k ...) is never read.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections.abc import Sequence

import torch

from loralens.lens.runtime.devices import input_device
from loralens.lens.runtime.tokens import encode_prompts, eos_ids, pad_id

# Sampling no longer draws from torch's process-wide RNG (each row has its own generator), so it needs no lock.
# Worker processes still take this lock around model and scorer loading (`tasks.workers.worker_process`); it is
# kept for them and is never waited on by sampling.
RNG_LOCK = threading.RLock()

# The 64-bit seed space torch.manual_seed accepts without wrapping is [0, 2**63).
_SEED_MODULUS = 2**63


def hash_seed(seed: int, *index: int) -> int:
    """Return a stable seed in [0, 2**63) derived from `seed` and any number of indices (e.g. a prompt index).

    sha256 of the decimal numbers, so the value is the same in every process and Python version (unlike hash()).
    """
    key = ":".join(str(int(x)) for x in (seed, *index)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % _SEED_MODULUS


def prompt_key(prompt: str) -> int:
    """Return a prompt's stable identity: the first 8 bytes of the sha256 of its text, as an integer."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")


def sample_seed(seed: int, prompt: str, sample: int) -> int:
    """Return the seed of the `sample`-th continuation of `prompt`: a function of (seed, prompt text, sample) only."""
    return hash_seed(seed, prompt_key(prompt), sample)


def prompt_batches(n_prompts: int, batch_size: int) -> list[range]:
    """Return the prompt index ranges [start, stop) of size batch_size: the intervene stage's prompt batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [range(s, min(s + batch_size, n_prompts)) for s in range(0, n_prompts, batch_size)]


def _cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    """Return ids up to (without) the first eos; what follows is the padding of a finished row."""
    for pos, t in enumerate(ids):
        if t in eos:
            return ids[:pos]
    return ids


def nucleus_probs(logits: torch.Tensor, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """Return next-token probabilities `[rows, vocab]` float32 after temperature and nucleus (top-p) filtering.

    The smallest set of most likely tokens whose probability reaches top_p is kept (at least one token), as in
    Hugging Face's TopPLogitsWarper; each row is filtered on its own.
    """
    scores = logits.float() / temperature  # [rows, vocab]
    ascending, order = scores.sort(dim=-1)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop[:, -1] = False  # the most likely token always stays
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf")).softmax(dim=-1)


def draw_tokens(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Return one token id per row `[rows]` long, row i drawn from `probs[i]` with one uniform of `generators[i]`.

    Inverse-CDF sampling: a row's draw depends on its own probabilities and generator only.
    """
    # [rows]: drawn on the host, where the generators live, so a seed gives the same uniform on every device
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])  # host: see above
    cdf = probs.double().cumsum(dim=-1)  # [rows, vocab]
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # [rows, 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


class _Stepper:
    """One model's forward for sampling: last-position logits and the KV cache, whatever its transformers names."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.model = model
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        self.keep_last = "logits_to_keep" in params

    def __call__(self, past=None, **inputs) -> tuple[torch.Tensor, object]:
        """Return (last-position logits `[rows, vocab]`, the KV cache) of one forward pass."""
        if past is not None:
            inputs[self.cache_arg] = past
        if self.keep_last:
            inputs["logits_to_keep"] = 1  # the prompt's other positions' logits are never read
        out = self.model(**inputs, use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        return out.logits[:, -1, :], cache


@torch.no_grad()
def sample_rows(model, tokenizer, rows: Sequence[str], seeds: Sequence[int], *, max_new_tokens: int = 20,
                top_p: float = 0.9, temperature: float = 1.0, max_prompt_tokens: int | None = None
                ) -> list[list[int]]:
    """Return the new token ids of one sample per row (each cut before its first eos), row i drawn with `seeds[i]`.

    Left-padded `[len(rows), longest prompt]`, then one forward of all rows per new token with the KV cache
    (stopping early once every row has ended). Row i's ids depend only on (rows[i], seeds[i], the settings, the
    model). At most max_new_tokens ids per row.
    """
    if len(seeds) != len(rows):
        raise ValueError(f"seeds: one per row expected, got {len(seeds)} for {len(rows)} rows")
    if not rows or max_new_tokens < 1:
        return [[] for _ in rows]
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, model)
    device = input_device(model)
    batch = encode_prompts(tokenizer, rows, pad_token_id=pad, max_prompt_tokens=max_prompt_tokens)
    mask = batch["attention_mask"].to(device)  # [rows, width]
    position = (mask.cumsum(-1) - 1).clamp_(min=0)  # [rows, width]: left padding does not shift positions
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    step_model = _Stepper(model)
    logits, past = step_model(input_ids=batch["input_ids"].to(device), attention_mask=mask, position_ids=position)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = draw_tokens(nucleus_probs(logits, top_p, temperature), generators)  # [rows]
        token = torch.where(done, pad, token.to(device))
        new.append(token)
        done |= torch.isin(token, eos_tensor)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
        position = position[:, -1:] + 1
        logits, past = step_model(past, input_ids=token[:, None], attention_mask=mask, position_ids=position)
    ids = torch.stack(new, dim=-1).tolist()  # [rows, new]
    eos_set = set(eos)
    return [_cut_at_eos(row, eos_set) for row in ids]


def decode_continuations(tokenizer, ids: Sequence[Sequence[int]]) -> list[str]:
    """Return the text of each continuation's ids, special tokens skipped and spacing kept exactly as generated."""
    return tokenizer.batch_decode([list(r) for r in ids], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)


def generate_joint(model, tokenizer, prompts: Sequence[str], *, k: int, max_new_tokens: int = 20,
                   top_p: float = 0.9, temperature: float = 1.0, seed: int = 0,
                   max_prompt_tokens: int | None = None) -> list[list[str]]:
    """Return k continuations per prompt, sampled together as `[len(prompts) * k]` rows of one `sample_rows`.

    Sample j of a prompt is seeded by `sample_seed(seed, prompt, j)`: its text does not depend on the batch it is
    sampled in. Many times faster than one call per prompt on CPU, where a step's cost is mostly per-call overhead.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = [p for p in prompts for _ in range(k)]
    seeds = [sample_seed(seed, p, j) for p in prompts for j in range(k)]
    ids = sample_rows(model, tokenizer, rows, seeds, max_new_tokens=max_new_tokens, top_p=top_p,
                      temperature=temperature, max_prompt_tokens=max_prompt_tokens)
    texts = decode_continuations(tokenizer, ids)
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
