"""The lens training objective over many layers: cached `z` in, mean KL(model || lens) out.

A `LensSet` holds one `LensBank` per trained layer, all sharing one frozen `FoldedUnembed`, plus the
frozen output projections `W_O` needed to turn cached `z` into per-head lens inputs
`x_h = z_h @ W_O[h] / scale`. Its forward returns the training loss of one micro-batch, so a DeepSpeed
engine can wrap it directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from loralens.lens.lenses.fused_kl import takes_fused
from loralens.lens.lenses.lens_set import FoldedUnembed, LensBank, LensConfig, lens_inputs
from loralens.lens.lenses.losses import ExactTarget, exact_target, kl_exact, kl_from_logits, kl_subset
from loralens.lens.lenses.upcast import Upcast

LOSSES = ("subset", "exact")


@dataclass
class LensBatch:
    """One micro-batch of cached tokens; `n` rows, `L` trained layers."""

    z: Tensor  # [n, L, heads*d_head] fp16/bf16
    scale: Tensor  # [n] final-norm divisor
    mask: Tensor  # [n] bool, False for rows that only pad the batch
    h_final: Tensor | None = None  # [n, d_model] lm_head input (exact targets)
    topk_ids: Tensor | None = None  # [n, k]
    topk_logprobs: Tensor | None = None  # [n, k]

    def to(self, device: torch.device | str) -> LensBatch:
        """Return the batch on `device`; to a GPU from pinned host memory with non-blocking copies (the copy
        overlaps the previous step's kernels)."""
        device = torch.device(device)
        if device.type != "cuda":
            return LensBatch(**{k: None if v is None else v.to(device) for k, v in self.__dict__.items()})
        return LensBatch(**{k: None if v is None else v.pin_memory().to(device, non_blocking=True)
                            for k, v in self.__dict__.items()})

    def rows(self, rows: slice) -> LensBatch:
        """Return the batch restricted to `rows` (views, no copy)."""
        return LensBatch(**{k: None if v is None else v[rows] for k, v in self.__dict__.items()})


class LensSet(nn.Module):
    """Lens banks for several layers of one model, trained jointly in one job."""

    def __init__(
        self,
        unembed: FoldedUnembed,
        w_o: Tensor,
        layers: list[int],
        config: LensConfig,
        *,
        lm_head: Tensor | None = None,
        lm_head_bias: Tensor | None = None,
        loss: str = "exact",
        chunk: int = 256,
        base_dtype: str = "float32",
        w_base: Tensor | None = None,
        fused: bool | None = None,
    ) -> None:
        """`w_o`: `[L, heads, d_head, d_model]` for `layers`; `lm_head` `[vocab, d_model]` for exact targets.

        `w_base`: the unembedding already cast to `base_dtype` (shared by several LensSets: no second copy).
        `fused`: compute the lora exact loss with its gradient in the forward (`fused_kl`); None: always for
        per_head, and for joint where `prefers_fused` says so for each micro-batch's tokens; False: checkpointed
        chunks always.
        """
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if loss == "exact" and lm_head is None:
            raise ValueError("loss 'exact' needs the lm_head weight to recompute target logits")
        self.layers = list(layers)
        self.config = config
        self.loss_kind = loss
        self.chunk = chunk
        if fused and (config.form, loss) != ("lora", "exact"):
            raise ValueError("fused needs the lora form and the exact loss")
        self.fused = fused
        self.unembed = unembed
        self.banks = nn.ModuleList(LensBank(unembed, w_o.shape[1], config, layer) for layer in self.layers)
        self.register_buffer("w_o", w_o.detach().float(), persistent=False)
        # The frozen base projection in training may run in bf16 (2.7x the fp32 GEMM rate on an AVX512-BF16
        # CPU, ~0.3% relative logit error); targets and evaluation always use fp32.
        self.base_dtype = getattr(torch, base_dtype)
        w_base = unembed.W if w_base is None else w_base  # the same tensor when no cast is needed: no copy
        self.register_buffer("w_base", w_base if w_base.dtype == self.base_dtype else w_base.to(self.base_dtype),
                             persistent=False)
        self.register_buffer("lm_head", None if lm_head is None else lm_head.detach(), persistent=False)
        self.register_buffer("lm_head_bias", None if lm_head_bias is None else lm_head_bias.detach(),
                             persistent=False)

    def inputs(self, batch: LensBatch, i: int, rows: slice = slice(None)) -> Tensor:
        """Return layer i's per-head lens inputs `[n, heads, d_model]` for `rows` (no grad: all frozen)."""
        with torch.no_grad():
            return lens_inputs(batch.z[rows, i], batch.scale[rows], self.w_o[i])

    def target_logits(self, batch: LensBatch) -> Tensor:
        """Return the model's exact final logits `[n, vocab]` from the cached lm_head inputs."""
        with torch.no_grad():
            out = batch.h_final.to(self.lm_head.dtype) @ self.lm_head.T
            return (out if self.lm_head_bias is None else out + self.lm_head_bias).float()

    def lens_fn(self, i: int, x: Tensor) -> Callable[[slice], Tensor]:
        """Return rows -> lens logits for layer i under the configured objective."""
        bank = self.banks[i]
        # Call the module (forward picks layer or head logits by objective): ZeRO-3 gathers a bank's
        # partitioned parameters only in its forward hooks. One Upcast for all the chunks (and their recomputes):
        # bf16 parameters' chunk gradients are summed in fp32 and rounded once (fp32 parameters: untouched).
        upcast = Upcast()
        if self.config.objective == "joint" and self.config.form == "lora":
            # The frozen base projection is the bulk of the FLOPs and needs no graph: compute it once here
            # rather than again in every checkpointed chunk's backward recompute.
            base = self.frozen_base(x).float()
            return lambda rows: bank(x[rows], base[rows], upcast=upcast)
        return lambda rows: bank(x[rows], upcast=upcast)

    def frozen_base(self, x: Tensor) -> Tensor:
        """Return the joint lora lens's frozen part `W_fold sum_h x_h` `[n, vocab]` in `base_dtype` (no graph)."""
        with torch.no_grad():
            return x.sum(1).to(self.base_dtype) @ self.w_base.T

    def uses_fused(self, tokens: int) -> bool:
        """Return whether a micro-batch of `tokens` takes the fused loss (`fused_kl`)."""
        if self.fused is not None:
            return self.fused
        n_heads, base_bytes = self.w_o.shape[1], self.w_base.element_size()
        return takes_fused(self.config.form, self.config.objective, self.loss_kind, n_heads, self.config.rank,
                           tokens, base_bytes)

    def layer_loss(self, batch: LensBatch, i: int, target: ExactTarget | None = None) -> Tensor:
        """Return layer i's loss: KL(model || lens), mean over masked tokens (and heads for per_head)."""
        x = self.inputs(batch, i)
        if self.uses_fused(len(x)):
            target = exact_target(self.target_logits(batch)) if target is None else target
            base = self.frozen_base(x) if self.config.objective == "joint" else None
            return self.banks[i](x, base, target=target, mask=batch.mask, chunk=self.chunk)
        fn = self.lens_fn(i, x)
        if self.loss_kind == "exact":
            target = exact_target(self.target_logits(batch)) if target is None else target
            return kl_exact(target, fn, batch.mask, chunk=self.chunk)
        return kl_subset(batch.topk_ids, batch.topk_logprobs, fn, batch.mask, chunk=self.chunk)

    def forward(self, batch: LensBatch) -> Tensor:
        """Return the mean over layers of each layer's loss (one scalar for the whole micro-batch)."""
        target = exact_target(self.target_logits(batch)) if self.loss_kind == "exact" else None
        losses = [self.layer_loss(batch, i, target) for i in range(len(self.layers))]
        return torch.stack(losses).mean()


EVAL_BLOCK_BYTES = 1 << 28  # one fp32 [chunk, heads, vocab] block of held-out evaluation: 256 MiB


def eval_chunk(n_heads: int, vocab: int, block_bytes: int = EVAL_BLOCK_BYTES) -> int:
    """Return the positions per evaluation chunk so that one `[chunk, heads, vocab]` fp32 block fits `block_bytes`."""
    return max(1, block_bytes // (n_heads * vocab * 4))


@torch.no_grad()
def fidelity(lens_set: LensSet, batch: LensBatch, chunk: int | None = None) -> dict[str, Tensor]:
    """Return exact held-out KL sums of trained lens vs logit lens, per head and per layer.

    Keys: `head_lens`, `head_logit_lens` `[L, heads]`; `layer_lens`, `layer_logit_lens`, `layer_subset` `[L]`;
    `tokens`. Per head: that head's lens alone vs the model. Per layer: the sum of the layer's head lenses
    (the joint read-out) vs the model; its logit-lens baseline adds the folded unembedding's bias once;
    `layer_subset` is the top-k + tail KL of the same read-out (needs the batch's top-k, else zeros).
    Sums over tokens, so batches add up; divide by `tokens` for means. `chunk` positions at a time (default
    :func:`eval_chunk`): the peak is about three `[chunk, heads, vocab]` fp32 blocks, whatever the batch.
    """
    L, H = len(lens_set.layers), lens_set.w_o.shape[1]
    chunk = chunk or eval_chunk(H, lens_set.unembed.vocab)
    dev = lens_set.unembed.W.device  # the batch is expected there too (`LensBatch.to`)
    out = {k: torch.zeros(L, H, device=dev) for k in ("head_lens", "head_logit_lens")}
    out |= {k: torch.zeros(L, device=dev) for k in ("layer_lens", "layer_logit_lens", "layer_subset")}
    m = batch.mask
    out["tokens"] = m.sum().float()
    for start in range(0, len(m), chunk):
        rows = slice(start, start + chunk)
        keep = m[rows]
        if not keep.any():
            continue
        target = exact_target(lens_set.target_logits(batch.rows(rows))[keep])  # [n, V] probabilities
        lora = lens_set.config.form == "lora"
        for i, bank in enumerate(lens_set.banks):
            x = lens_set.inputs(batch, i, rows)[keep]
            base_logits = lens_set.unembed(x).float()  # [n, H, V], the logit lens, computed once
            head = bank.head_logits(x, base_logits if lora else None).float()
            out["head_lens"][i] += kl_from_logits(target, head).sum(0)
            del head
            out["head_logit_lens"][i] += kl_from_logits(target, base_logits).sum(0)
            summed = base_logits.sum(1)  # W (sum_h x_h) = sum_h W x_h
            layer = bank.layer_logits(x, summed if lora else None).float()
            del base_logits
            out["layer_lens"][i] += kl_from_logits(target, layer).sum()
            out["layer_logit_lens"][i] += kl_from_logits(target, summed + lens_set.unembed.b).sum()
            if batch.topk_ids is not None:  # the subset KL of these same fp32 logits, per token summed
                n_keep = int(keep.sum())
                out["layer_subset"][i] += n_keep * kl_subset(
                    batch.topk_ids[rows][keep], batch.topk_logprobs[rows][keep], layer,
                    chunk=n_keep)
    return out

