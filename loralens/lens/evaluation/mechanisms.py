"""Mechanism checks: attention-pattern scores of every head on repeated random tokens, and how often a head's lens
read-out names the token an induction head should copy (Olsson et al. 2022; TransformerLens's conventions).

Input: `B` sequences `[BOS] + r + r`, `r` = `L` (= seq_len) random token ids; `off` = 1 with a BOS, else 0; `T` =
off + 2L positions. Second-copy position i (off + L <= i < off + 2L) holds the token first seen at i - L, so an
induction head attends from i to i - L + 1 (the token after the previous occurrence) and copies it: the next token.

    induction score       mean attention from second-copy i to i - L + 1, over the L second-copy positions
    previous-token score  mean attention from i to i - 1, over every position i >= 1
    copy rate (top-k)     fraction of second-copy positions with a next token in the input (i < off + 2L - 1:
                          L - 1 per sequence) whose next token is in the top-k of the head's output alone, read
                          through the plain logit lens (`W_fold x_h`) or a trained lens bank (`lens_inputs`,
                          `head_logits_both`: the readout the decode stage uses)
    copy rate, effect     the same positions and top-k, read from what the head adds to the model's own output:
                          the model's next-token log-probs minus those with the head mean-ablated (its z set to its
                          mean over `mean_tokens`, a second batch of repeated tokens): every path from the head to
                          the output (through later heads and MLPs), where the two lenses read only `W_fold x_h`.
                          One forward pass per head; optional (`mean_tokens`)
    model top-1 rate      the same positions, the model's own next-token top-1

Shapes: `NL` layers, `H` query heads (attention is per query head, also under GQA), `d` d_model, `V` vocabulary,
`n` scored positions (B * (L - 1)).

`model_mechanism_scores` builds the input for a loaded model (special ids excluded, its BOS first) and scores it;
`mechanism_rows` gives one row per head; `induction_summary` (and `summary_line`) say how many induction heads read
at least as well through the trained lens as through the logit lens, and which head copies best. Used by
`Lenses.mechanisms`, `loralens inspect --mechanisms` and benchmarks/lens_mechanisms.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from loralens.lens.heads.edits import mean_head_z
from loralens.lens.heads.effects import head_effects
from loralens.lens.heads.hooks import capture
from loralens.lens.lenses.lens_set import FoldedUnembed, LensBank, lens_inputs
from loralens.lens.lenses.readout import head_logits_both, row_chunks
from loralens.lens.runtime.adapters import ArchAdapter, ModelDims, folded_unembedding, norm_scale, out_proj_weight
from loralens.lens.runtime.devices import input_device

if TYPE_CHECKING:
    from loralens.lens.runtime.models import LoadedModel

INDUCTION_THRESHOLD = 0.3  # an "induction head": induction score >= this (why: benchmarks/lens_mechanisms.py)


def repeated_tokens(vocab: int, seq_len: int, batch: int, *, seed: int, exclude: Sequence[int] = (),
                    bos: int | None = None) -> Tensor:
    """Return `[B, off + 2L]` int64 ids `[bos] + r + r`, r drawn uniformly (with replacement) from `range(vocab)`
    minus `exclude`, by a generator seeded with `seed`."""
    allowed = torch.ones(vocab, dtype=torch.bool)  # host: token ids drawn with a CPU generator, moved by the caller
    allowed[[t for t in exclude if 0 <= t < vocab]] = False
    pool = allowed.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    r = pool[torch.randint(len(pool), (batch, seq_len), generator=g)]  # host: a CPU generator, reproducible
    parts = [r, r] if bos is None else [torch.full((batch, 1), bos, dtype=torch.long), r, r]  # host
    return torch.cat(parts, dim=1)


def stripe_score(attn: Tensor, lag: int, first: int) -> Tensor:
    """Return the mean attention `[..., H]` from each query position i >= `first` to key i - `lag`.

    `attn` is `[..., B, H, T, T]` (query, key); the mean is over sequences and those query positions.
    """
    if not 1 <= lag <= first < attn.shape[-1]:
        raise ValueError(f"need 1 <= lag ({lag}) <= first ({first}) < positions ({attn.shape[-1]})")
    stripe = attn.diagonal(offset=-lag, dim1=-2, dim2=-1)  # [..., B, H, T - lag]; entry k is query k + lag
    return stripe[..., first - lag:].float().mean(dim=-1).mean(dim=-2)


def induction_score(attn: Tensor, seq_len: int, offset: int) -> Tensor:
    """Return `[..., H]`: mean attention from second-copy position i to i - L + 1, of attn `[..., B, H, T, T]`."""
    return stripe_score(attn, seq_len - 1, offset + seq_len)


def prev_token_score(attn: Tensor) -> Tensor:
    """Return `[..., H]`: mean attention from position i to i - 1 over every i >= 1, of attn `[..., B, H, T, T]`."""
    return stripe_score(attn, 1, 1)


def copy_rows(seq_len: int, offset: int) -> slice:
    """Return the second-copy positions whose next token is in the input: `off + L <= i < off + 2L - 1`."""
    return slice(offset + seq_len, offset + 2 * seq_len - 1)


def hit_rates(logits: Tensor, targets: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Return the counts `[H]` of positions whose target is the top-1, and in the top-k, of logits `[n, H, V]`.

    `targets` is `[n]`; counts (not rates) so that chunks add up.
    """
    ids = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # [n, H, k]
    hit = ids == targets[:, None, None]
    return hit[..., 0].sum(0), hit.any(-1).sum(0)


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run `model` with eager attention (the implementation that returns attention patterns); restore on exit."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@dataclass
class RepeatedRun:
    """One forward pass over repeated tokens: patterns, per-layer z, final norm divisor, logits."""

    attn: Tensor  # [NL, B, H, T, T] fp32
    z: dict[int, Tensor]  # layer -> [B, T, H*d_head]
    scale: Tensor  # [B, T] final norm divisor of the pre-norm residual
    logits: Tensor  # [B, T, V]


@torch.no_grad()
def run_repeated(model: nn.Module, adapter: ArchAdapter, tokens: Tensor) -> RepeatedRun:
    """Return the attention patterns, z of every layer, final norm divisor and logits of `tokens` `[B, T]`."""
    n_layers = len(adapter.layers(model))
    with eager_attention(model), capture(model, adapter, range(n_layers)) as cap:
        out = model(input_ids=tokens.to(input_device(model)), output_attentions=True, use_cache=False)
    return RepeatedRun(attn=torch.stack([a.float() for a in out.attentions]), z=dict(cap.z),
                       scale=norm_scale(adapter, model, cap.final_resid).squeeze(-1), logits=out.logits)


@dataclass(frozen=True)
class CopyPositions:
    """The scored second-copy positions of one repeated-token run, `n` = B * (L - 1) of them (host tensors as the
    run left them)."""

    targets: Tensor  # [n] the token to copy (the next token)
    scale: Tensor  # [n] final norm divisor
    z: dict[int, Tensor]  # layer -> [n, H*d_head]
    model_top1: float  # the model's own next-token top-1 rate at these positions

    def inputs(self, layer: int, w_o: Tensor) -> Tensor:
        """Return the heads' lens inputs `[n, H, d]` of `layer` at these positions (`w_o` `[H, d_head, d]`)."""
        return lens_inputs(self.z[layer], self.scale, w_o)


def copy_positions(run: RepeatedRun, tokens: Tensor, seq_len: int, offset: int) -> CopyPositions:
    """Return the copy positions (`copy_rows`) of `run` on `tokens` `[B, off + 2L]`: targets, scale, z per layer."""
    rows = copy_rows(seq_len, offset)
    targets = tokens[:, rows.start + 1:rows.stop + 1].reshape(-1)
    own = run.logits[:, rows].argmax(-1).reshape(-1).cpu() == targets
    return CopyPositions(targets=targets, scale=run.scale[:, rows].reshape(-1),
                         z={layer: z[:, rows].reshape(len(targets), -1) for layer, z in run.z.items()},
                         model_top1=own.float().mean().item())


def head_copy_counts(z: Tensor, scale: Tensor, w_o: Tensor, targets: Tensor, unembed: FoldedUnembed,
                     bank: LensBank | None, k: int, chunk: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Return lens -> (top-1 hits, top-k hits) `[H]` of one layer's heads read alone, over `n` positions.

    `z [n, H*d_head]`, `scale [n]`, `w_o [H, d_head, d]`, `targets [n]`. "logit" is `W_fold x_h` (the logit lens
    as `head_logits_both` computes it); "trained" (only with a `bank`) is the bank's lens on the same inputs.
    """
    counts: dict[str, list[Tensor]] = {}
    for rows in row_chunks(len(targets), chunk):
        x = lens_inputs(z[rows], scale[rows], w_o)  # [c, H, d]
        if bank is None:
            with torch.no_grad():
                by_lens = {"logit": unembed(x).float()}
        else:
            trained, logit = head_logits_both(bank, x)
            by_lens = {"logit": logit, "trained": trained}
        for lens, logits in by_lens.items():
            top1, topk = hit_rates(logits, targets[rows].to(logits.device), k)
            old = counts.get(lens, [0, 0])
            counts[lens] = [old[0] + top1, old[1] + topk]
    return {lens: (c[0], c[1]) for lens, c in counts.items()}


@torch.no_grad()
def effect_copy_counts(model: nn.Module, adapter: ArchAdapter, dims: ModelDims, tokens: Tensor, rows: slice,
                       targets: Tensor, mean_tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Return top-1 and top-k hits `[NL, H]` of every head's effect read-out at positions `rows` of `tokens`.

    A head's effect read-out here is its log-prob lift `log p(model) - log p(model, head mean-ablated)` `[n, V]`
    (`loralens.lens.heads.effects`; the lift, not the probability added, which favours the model's own guess and
    so would credit any head that sharpens it with the copy). Its mean z is taken over `mean_tokens` (a batch
    drawn apart from `tokens`), so a head's average output, the same in every context, cancels. `targets` `[n]`.
    """
    means = mean_head_z(model, adapter, dims, [(mean_tokens, None)], range(dims.n_layers))
    top1 = torch.zeros(dims.n_layers, dims.n_heads, dtype=torch.long)  # host: per-head counts
    topk = torch.zeros_like(top1)
    heads = [(layer, head) for layer in range(dims.n_layers) for head in range(dims.n_heads)]
    for (layer, head), base, ablated in head_effects(model, adapter, dims, tokens, rows, heads, means):
        hits = hit_rates((base - ablated)[:, None], targets.to(base.device), k)
        top1[layer, head], topk[layer, head] = (int(h[0]) for h in hits)
    return top1, topk


@dataclass(frozen=True)
class MechanismScores:
    """Every head's attention-pattern scores and copy rates on one batch of repeated tokens (each `[NL, H]`)."""

    induction: Tensor
    prev_token: Tensor
    copy_top1_logit: Tensor
    copy_top5_logit: Tensor
    copy_top1_trained: Tensor  # NaN where a layer has no trained lens
    copy_top5_trained: Tensor
    copy_top1_effect: Tensor  # NaN unless measured (`mean_tokens`)
    copy_top5_effect: Tensor
    model_top1: float  # the model's own next-token top-1 rate at the scored positions
    n_positions: int  # scored positions n = B * (L - 1)

    @property
    def has_trained(self) -> bool:
        """Return True when at least one layer was read through a trained lens."""
        return bool(torch.isfinite(self.copy_top1_trained).any())


@torch.no_grad()
def mechanism_scores(model: nn.Module, adapter: ArchAdapter, dims: ModelDims, tokens: Tensor, seq_len: int,
                     offset: int, banks: dict[int, LensBank] | None = None, *, mean_tokens: Tensor | None = None,
                     k: int = 5, chunk: int = 64) -> MechanismScores:
    """Return induction and previous-token scores and copy rates of every head on `tokens` `[B, off + 2L]`.

    `banks`: layer -> trained lens bank (any subset of layers); without one only the logit lens is read. The logit
    lens uses the banks' shared folded unembedding when given (the same fold of the same model), else the model's.
    `mean_tokens` `[B', off + 2L']`: also the effect read-out (`effect_copy_counts`), the heads' means over it.
    """
    run = run_repeated(model, adapter, tokens)
    banks = banks or {}
    unembed = next(iter(banks.values())).unembed if banks else FoldedUnembed(*folded_unembedding(adapter, model))
    pos = copy_positions(run, tokens, seq_len, offset)
    targets, scale = pos.targets, pos.scale
    shape = (dims.n_layers, dims.n_heads)
    out = {f"{name}_{lens}": torch.full(shape, math.nan)  # host: per-head results, filled from .cpu() values
           for name in ("top1", "top5") for lens in READS}
    for layer, z in pos.z.items():
        w_o = out_proj_weight(adapter, model, layer, dims).float().to(unembed.W.device)
        zl = z.to(unembed.W.device)
        counts = head_copy_counts(zl, scale.to(unembed.W.device), w_o, targets, unembed, banks.get(layer), k, chunk)
        for lens, (top1, topk) in counts.items():
            out[f"top1_{lens}"][layer] = top1.cpu().float() / len(targets)
            out[f"top5_{lens}"][layer] = topk.cpu().float() / len(targets)
    if mean_tokens is not None:
        rows = copy_rows(seq_len, offset)
        top1, topk = effect_copy_counts(model, adapter, dims, tokens, rows, targets, mean_tokens, k)
        out["top1_effect"], out["top5_effect"] = top1.float() / len(targets), topk.float() / len(targets)
    return MechanismScores(induction=induction_score(run.attn, seq_len, offset).cpu(),
                           prev_token=prev_token_score(run.attn).cpu(), copy_top1_logit=out["top1_logit"],
                           copy_top5_logit=out["top5_logit"], copy_top1_trained=out["top1_trained"],
                           copy_top5_trained=out["top5_trained"], copy_top1_effect=out["top1_effect"],
                           copy_top5_effect=out["top5_effect"], model_top1=pos.model_top1,
                           n_positions=len(targets))


# what a head's copy rate is read from: its logit lens, its trained lens, its effect on the model's output
READS = ("logit", "trained", "effect")
COLUMNS = ("induction_score", "prev_token_score") + tuple(f"copy_top{k}_{read}" for read in READS for k in (1, 5))


def mechanism_rows(scores: MechanismScores) -> list[dict]:
    """Return one row per head: layer, head and the eight `COLUMNS` (None where not measured: a layer without a
    trained lens, the effect when not asked for)."""
    grids = {"induction_score": scores.induction, "prev_token_score": scores.prev_token,
             **{c: getattr(scores, c) for c in COLUMNS[2:]}}
    n_layers, n_heads = scores.induction.shape
    return [{"layer": layer, "head": head, **{c: _value(g[layer, head]) for c, g in grids.items()}}
            for layer in range(n_layers) for head in range(n_heads)]


def _value(x: Tensor) -> float | None:
    """Return a float, or None for NaN."""
    v = float(x)
    return None if math.isnan(v) else v


def model_mechanism_scores(loaded: LoadedModel, banks: dict[int, LensBank] | None = None, *, batch: int = 8,
                           seq_len: int = 25, seed: int = 0, effect: bool = False) -> MechanismScores:
    """Return `mechanism_scores` of a loaded model on `batch` sequences `[BOS] + r + r` of `seq_len` random ids.

    The ids exclude the tokenizer's special ids; the BOS is its `bos_token_id` (none when it has none), so `T` =
    off + 2L with off = 1 with a BOS, else 0. `banks`: layer -> trained lens bank (None: the logit lens only).
    `effect`: also every head's effect read-out, the heads' means over `batch` more sequences drawn with seed + 1.
    """
    tokens, offset = model_repeated_tokens(loaded, batch=batch, seq_len=seq_len, seed=seed)
    mean_tokens = model_repeated_tokens(loaded, batch=batch, seq_len=seq_len, seed=seed + 1)[0] if effect else None
    return mechanism_scores(loaded.model, loaded.adapter, loaded.dims, tokens, seq_len, offset, banks,
                            mean_tokens=mean_tokens)


def model_repeated_tokens(loaded: LoadedModel, *, batch: int, seq_len: int, seed: int) -> tuple[Tensor, int]:
    """Return `repeated_tokens` for a loaded model (its special ids excluded, its BOS first if it has one) and the
    offset (1 with a BOS, else 0)."""
    tok = loaded.tokenizer
    bos = tok.bos_token_id
    tokens = repeated_tokens(loaded.dims.vocab, seq_len, batch, seed=seed, exclude=tok.all_special_ids, bos=bos)
    return tokens, int(bos is not None)


def head_name(row: dict) -> str:
    """Return a row's head as `LxHy`."""
    return f"L{row['layer']}H{row['head']}"


# a read-out's copy rate of one head against the logit lens's; "both_zero" separates the ties that say nothing
COMPARISONS = {"ge": lambda t, g: t >= g, "gt": lambda t, g: t > g, "both_zero": lambda t, g: t == g == 0}
COMPARED = ("trained", "effect")  # the read-outs compared with the logit lens
READ_NAMES = {"logit": "logit lens", "trained": "trained lens", "effect": "effect"}


def best_copiers(rows: list[dict]) -> dict[str, dict]:
    """Return read -> the head with the highest copy top-1 rate through that read-out (the first one on ties).

    Each value: head (`LxHy`), rate (through that read-out), `copy_top1_{read}` of every read of `READS` (None where
    not measured), induction_score. A read-out no row was measured with (no trained lens, no effect) is left out.
    """
    out = {}
    for read in READS:
        key = f"copy_top1_{read}"
        measured = [r for r in rows if r[key] is not None]
        if measured:
            best = max(measured, key=lambda r, k=key: r[k])
            out[read] = {"head": head_name(best), "rate": best[key],
                         **{f"copy_top1_{other}": best[f"copy_top1_{other}"] for other in READS},
                         "induction_score": best["induction_score"]}
    return out


def induction_summary(rows: list[dict], threshold: float = INDUCTION_THRESHOLD) -> dict:
    """Return the induction heads (induction score >= `threshold`), how many copy at least as well / better through
    the trained lens, and through their effect, than through the logit lens (and how many of those ties are both
    zero) at top-1 and top-5, the head counts at thresholds 0.1-0.5 and the best copying head per read-out.

    `rows`: `mechanism_rows` dicts (layer, head, the eight `COLUMNS`; None where not measured). Counts
    `n_{read}_{ge,gt,both_zero}_logit_top{1,5}` are over the induction heads measured with that read-out
    (`n_with_{read}`; `n_with_trained_lens` for the trained lens).
    """
    heads = [r for r in rows if r["induction_score"] >= threshold]
    at = {str(t): sum(r["induction_score"] >= t for r in rows) for t in (0.1, 0.2, 0.3, 0.5)}
    out = {"threshold": threshold, "induction_heads": [head_name(r) for r in heads], "n_heads_at_threshold": at,
           "n_induction_heads": len(heads)}
    for read in COMPARED:
        compared = [r for r in heads if r[f"copy_top1_{read}"] is not None]
        out["n_with_trained_lens" if read == "trained" else f"n_with_{read}"] = len(compared)
        out.update({f"n_{read}_{name}_logit_top{k}": sum(cmp(r[f"copy_top{k}_{read}"], r[f"copy_top{k}_logit"])
                                                         for r in compared)
                    for k in (1, 5) for name, cmp in COMPARISONS.items()})
    return {**out, "best_copier": best_copiers(rows)}


def summary_line(summary: dict) -> str:
    """Return one line of an `induction_summary`: induction heads, trained lens and effect vs logit lens, the best
    copying head (one clause per head, naming the read-outs it copies best through when they differ)."""
    n = summary["n_induction_heads"]
    parts = [f"{n} induction head{'s' * (n != 1)} (score >= {summary['threshold']:g})"]
    for read in COMPARED:
        m = summary["n_with_trained_lens" if read == "trained" else f"n_with_{read}"]
        if m:
            parts.append(f"{READ_NAMES[read]} >= logit lens at top-1 on {summary[f'n_{read}_ge_logit_top1']} of {m} "
                         f"(both zero: {summary[f'n_{read}_both_zero_logit_top1']}), at top-5 on "
                         f"{summary[f'n_{read}_ge_logit_top5']} of {m}")
    if n and not summary["n_with_trained_lens"]:
        parts.insert(1, "none has a trained lens")
    best = summary["best_copier"]
    by_head: dict[str, list[str]] = {}
    for read in ("trained", "logit", "effect"):
        if read in best:
            by_head.setdefault(best[read]["head"], []).append(read)
    for head, reads in by_head.items():
        b = best[reads[0]]
        rates = ", ".join(f"{other} {b[f'copy_top1_{other}']:.3f}" for other in ("trained", "logit", "effect")
                          if b[f"copy_top1_{other}"] is not None)
        through = f" through the {' and '.join(READ_NAMES[r] for r in reads)}" if len(by_head) > 1 else ""
        parts.append(f"best copier{through} {head}: {rates}")
    return "; ".join(parts)
