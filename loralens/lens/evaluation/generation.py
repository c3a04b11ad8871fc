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

Speed. `nucleus_probs` + `draw_tokens` are the reference sampler (a full-vocabulary sort and float64 cumsum per row
per step). The loop uses `nucleus_sample`, which finds the same kept set from a top-k prefix, the same float32
probabilities, and on CPU the same float64 CDF, so the same token for the same uniform. The one documented
exception: a row whose nucleus boundary lies within `NUCLEUS_REL_GUARD` of 1 - top_p is sent to the full sort, so
the two can only disagree if the reference's own float32 rounding of that boundary mass exceeds the guard (measured
20x below it). `benchmarks/sampling_throughput.py` measures both against HF `generate()` and the forward-FLOP bound.
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
    Hugging Face's TopPLogitsWarper (ascending sort, float32 softmax, cumulative mass `<= 1 - top_p` dropped); each
    row is filtered on its own. This is the reference: one full-vocabulary sort per row. `nucleus_sample` finds the
    same kept set from a top-k prefix and gives bitwise these probabilities (`tests/test_generation.py`).
    """
    scores = logits.float() / temperature  # [rows, vocab]
    return scores.masked_fill(~_kept_by_sort(scores, top_p), float("-inf")).softmax(dim=-1)


def _kept_by_sort(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Return the nucleus `[rows, vocab]` bool of (temperature-scaled) scores, by the reference full sort."""
    ascending, order = scores.sort(dim=-1)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop[:, -1] = False  # the most likely token always stays
    return ~drop.scatter(-1, order, drop)


# Top-k prefix sizes tried, in turn, before the full sort (SmolLM2 on the challenging prompts: a median nucleus of
# ~100 tokens at top_p=0.9; half the rows are settled by the first prefix, 98% by the second).
NUCLEUS_PREFIXES = (128, 2048)
# A row whose nucleus boundary (the mass of its last kept token and all below it, or of its first dropped one) lies
# within NUCLEUS_REL_GUARD * (1 - top_p) of 1 - top_p goes to the full sort: there the reference's float32 rounding
# (its softmax's float32 normaliser over the sorted vocabulary) could decide otherwise than this float64 mass. The
# two differ by < 5e-7 relative on every row measured (4,800 random rows of 49,152 logits, 1,280 SmolLM2 rows), a
# 20x margin; on SmolLM2's logits ~2% of rows reach the full sort (nucleus > 2,048 tokens, or this guard).
NUCLEUS_REL_GUARD = 1e-5


def _kept_by_prefix(scores: torch.Tensor, probs: torch.Tensor, total: torch.Tensor, top_p: float, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (ids `[rows, k]`, kept `[rows, k]` bool, settled `[rows]` bool): each row's k most likely tokens and
    which of them its nucleus keeps, from `probs` (the softmax of `scores`) and `total` `[rows, 1]` (their float64 sum).

    A row is settled when its first dropped token is among the k (or k covers the vocabulary), no score tie
    straddles the boundary, and the boundary's mass is not within the guard of 1 - top_p: then its kept set is the
    one `_kept_by_sort` finds. Unsettled rows' `kept` is meaningless.
    """
    vocab = scores.shape[-1]
    k = min(k, vocab)
    top_scores, ids = scores.topk(k, dim=-1)  # [rows, k], most likely first
    top_probs = probs.gather(-1, ids).double()  # [rows, k]
    # [rows, k]: the mass of a token and all below it, normalised by the row's float64 total (not a float32 one)
    tail = (total - (top_probs.cumsum(dim=-1) - top_probs)) / total
    threshold = float(torch.tensor(1 - top_p, dtype=torch.float32))  # host: a scalar; the reference compares in fp32
    guard = NUCLEUS_REL_GUARD * threshold + 1e-12
    kept = tail > threshold  # a prefix of each row: tail never increases
    kept[:, 0] = True  # the most likely token always stays
    n = kept.sum(dim=-1, keepdim=True)  # [rows, 1] kept tokens
    last = n - 1
    first_dropped = n.clamp(max=k - 1)
    has_dropped = n < k  # [rows, 1]
    margin_kept = (tail.gather(-1, last) - threshold > guard) | (last == 0)
    margin_dropped = threshold - tail.gather(-1, first_dropped) >= guard
    tie = top_scores.gather(-1, last) == top_scores.gather(-1, first_dropped)
    settled = margin_kept & ((has_dropped & margin_dropped & ~tie) | (~has_dropped & (k == vocab)))
    return ids, kept, settled.squeeze(-1)


def _nucleus_groups(scores: torch.Tensor, probs: torch.Tensor, top_p: float
                    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Return ([(rows, ids, kept)] of the rows each top-k prefix settles, the rows left to the full sort `[open]`)."""
    total = probs.sum(dim=-1, keepdim=True, dtype=torch.float64)  # [rows, 1]
    open_rows = torch.arange(scores.shape[0], device=scores.device)
    groups = []
    for k in NUCLEUS_PREFIXES:
        if open_rows.numel() == 0:
            break
        if open_rows.numel() == scores.shape[0]:  # the first prefix: no row copied
            ids, kept, settled = _kept_by_prefix(scores, probs, total, top_p, k)
        else:
            ids, kept, settled = _kept_by_prefix(scores[open_rows], probs[open_rows], total[open_rows], top_p, k)
        if settled.any():
            groups.append((open_rows[settled], ids[settled], kept[settled]))
        open_rows = open_rows[~settled]
    return groups, open_rows


def nucleus_keep(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Return `nucleus_sample`'s kept set `[rows, vocab]` bool of (temperature-scaled) scores: `_kept_by_sort`'s,
    sorting only the rows the top-k prefixes leave open."""
    groups, open_rows = _nucleus_groups(scores, scores.softmax(dim=-1), top_p)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for rows, ids, kept in groups:
        keep.view(-1)[rows[:, None] * scores.shape[-1] + ids] = kept
    keep[open_rows] = _kept_by_sort(scores[open_rows], top_p)
    return keep


def draw_tokens(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Return one token id per row `[rows]` long, row i drawn from `probs[i]` with one uniform of `generators[i]`.

    Inverse-CDF sampling: a row's draw depends on its own probabilities and generator only. The reference of
    `nucleus_sample`'s draw (which sums only the kept tokens' probabilities, to the same float64 CDF).
    """
    return _draw(probs, _uniforms(generators, probs.device))


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Return `[rows]` the inverse-CDF draw of each row of `probs` `[rows, vocab]` at its uniform `u` `[rows]`."""
    cdf = probs.double().cumsum(dim=-1)  # [rows, vocab]
    target = (u * cdf[:, -1]).unsqueeze(-1)  # [rows, 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _uniforms(generators: Sequence[torch.Generator], device) -> torch.Tensor:
    """Return one float64 uniform per generator `[rows]`, drawn on the host (where the generators live, so a seed
    gives the same uniform on every device)."""
    u = [torch.rand((), generator=g, dtype=torch.float64) for g in generators]  # host: where the generators live
    return torch.stack(u).to(device)


def nucleus_sample(logits: torch.Tensor, top_p: float, temperature: float, generators: Sequence[torch.Generator]
                   ) -> torch.Tensor:
    """Return `draw_tokens(nucleus_probs(logits, top_p, temperature), generators)` `[rows]` without sorting the
    vocabulary of most rows.

    Each row's kept set comes from a top-k prefix (`NUCLEUS_PREFIXES`; the full sort only for the rows they leave
    open) and its probabilities from the same masked float32 softmax as `nucleus_probs`, so bitwise the same. The
    inverse CDF sums only the kept tokens' probabilities, in token order: the non-zero terms of `draw_tokens`' float64
    cumsum in the same order, so on CPU the same CDF values and the same token for the same uniform.
    """
    scores = logits.float() / temperature  # [rows, vocab]
    n_rows, vocab = scores.shape
    u = _uniforms(generators, scores.device)  # [rows]: one per row and step, whatever path the row takes
    groups, open_rows = _nucleus_groups(scores, scores.softmax(dim=-1), top_p)
    masked = torch.full_like(scores, float("-inf"))  # [rows, vocab]: the scores of kept tokens, -inf elsewhere
    for rows, ids, kept in groups:
        at = rows[:, None] * vocab + ids  # [g, k]: flat positions, so no row of the vocabulary is copied
        masked.view(-1)[at] = scores.view(-1)[at].masked_fill_(~kept, float("-inf"))
    if open_rows.numel():
        part = scores[open_rows]
        masked[open_rows] = part.masked_fill(~_kept_by_sort(part, top_p), float("-inf"))
    probs = masked.softmax(dim=-1)  # [rows, vocab]: nucleus_probs' values, row by row
    token = torch.empty(n_rows, dtype=torch.long, device=scores.device)
    flat = probs.view(-1)
    for rows, ids, kept in groups:
        ordered = ids.masked_fill(~kept, vocab).sort(dim=-1).values  # [g, k]: kept ids ascending, then `vocab`
        counts = kept.sum(dim=-1)  # [g]
        width = int(counts.max())
        ordered = ordered[:, :width]
        valid = ordered < vocab
        cdf = flat[rows[:, None] * vocab + ordered.clamp(max=vocab - 1)].double().masked_fill_(~valid, 0).cumsum(-1)
        pos = torch.searchsorted(cdf, (u[rows] * cdf[:, -1]).unsqueeze(-1), right=True)  # [g, 1]
        # past the last kept token (u * total rounding up to total) draw_tokens clamps to the last id: so here
        token[rows] = ordered.gather(-1, pos.clamp(max=width - 1)).squeeze(-1).masked_fill_(
            pos.squeeze(-1) >= counts, vocab - 1)
    if open_rows.numel():
        token[open_rows] = _draw(probs[open_rows], u[open_rows])
    return token


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
        token = nucleus_sample(logits, top_p, temperature, generators)  # [rows]
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
