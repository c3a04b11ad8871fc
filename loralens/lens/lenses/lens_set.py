"""Per-head vocabulary lenses sharing one frozen folded unembedding.

Shapes used throughout (one bank = one layer):

- ``x``: ``[tokens, heads, d_model]`` — per-head lens inputs ``x_h = c_h / scale``
  where ``c_h = z_h @ W_O[h]`` and ``scale`` is the final norm's per-token RMS.
- ``W_fold``: ``[vocab, d_model]``, ``b_fold``: ``[vocab]``.

Bias convention (direct logit attribution): the per-head logit lens is
``W_fold @ x_h`` WITHOUT ``b_fold``. ``b_fold`` belongs to the whole residual
stream, not to any one head; adding it per head would count it ``heads`` times
in the joint sum. Each lens instead has a learned per-head bias (zero-init) that
can absorb whatever prior helps. Consequently every form starts as the logit
lens: untrained ``head_logits(x) == W_fold @ x_h`` exactly.

Parameter shapes per form (``H`` heads, ``r`` rank, ``V`` vocab, ``d`` d_model):

- ``full``:     ``weight [H, V, d]`` (init W_fold), ``bias [H, V]``.
- ``lora``:     ``lora_A [H, r, d]``, ``lora_B [H, V, r]`` (zero), ``bias [H, V]``;
  logits_h = W_fold x_h + (alpha/r) B_h A_h x_h + bias_h.
- ``residual``: ``res_U [H, d, r]`` (zero), ``res_V [H, r, d]``, ``bias [H, V]``;
  logits_h = W_fold (x_h + (alpha/r) U_h V_h x_h) + bias_h.

bf16/fp16 parameters compute in fp32 (``LensBank.weights``, :mod:`loralens.lens.lenses.upcast`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loralens.lens.heads.hooks import head_contributions
from loralens.lens.lenses.fused_kl import fused_lora_kl, fused_lora_kl_per_head
from loralens.lens.lenses.losses import ExactTarget
from loralens.lens.lenses.upcast import Upcast, compute_dtype

FORMS = ("full", "lora", "residual")
OBJECTIVES = ("joint", "per_head")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def fingerprint_tensor(t: Tensor) -> str:
    """Return the first 16 hex chars of sha256 over the tensor's float32 bytes."""
    # Hash float32 bytes so the same weights give the same id whether they
    # arrive as bf16/fp32 (bf16 -> fp32 is exact) and on whichever device.
    # No copy for a contiguous fp32 CPU tensor: the hash reads the tensor's own buffer (2 GB at Llama-3-8B).
    data = t.detach().to("cpu", torch.float32).contiguous().numpy()  # host: hashing reads host bytes
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()[:16]


def lens_inputs(z: Tensor, scale: Tensor, w_o: Tensor) -> Tensor:
    """Return per-head lens inputs `x_h = z_h @ W_O[h] / scale` `[n, H, d]` (fp32) from z `[n, H*d_head]`, scale
    `[n]` and W_O `[H, d_head, d]`."""
    return head_contributions(z.float(), w_o.float()) / scale.float()[:, None, None]


class FoldedUnembed(nn.Module):
    """Frozen folded unembedding ``W_fold [vocab, d_model]``, ``b_fold [vocab]``.

    Buffers are non-persistent: a bank's ``state_dict`` never carries the (large,
    shared) base; the fingerprint identifies it instead.
    """

    def __init__(self, W_fold: Tensor, b_fold: Tensor | None = None, *, fingerprint: str | None = None) -> None:
        super().__init__()
        if W_fold.dim() != 2:
            raise ValueError(f"W_fold must be [vocab, d_model], got shape {tuple(W_fold.shape)}")
        vocab = W_fold.shape[0]
        if b_fold is None:
            b_fold = torch.zeros(vocab, dtype=W_fold.dtype, device=W_fold.device)
        if tuple(b_fold.shape) != (vocab,):
            raise ValueError(f"b_fold must be [{vocab}], got shape {tuple(b_fold.shape)}")
        self.register_buffer("W", W_fold.detach(), persistent=False)
        self.register_buffer("b", b_fold.detach().to(W_fold.dtype), persistent=False)
        # Computed once: the base is frozen, and hashing a 49k x 576 matrix per
        # call would dominate loading many layers.
        # `fingerprint`: a known fingerprint of this same W_fold (another module over the same tensors).
        self._fingerprint = fingerprint or fingerprint_tensor(W_fold)

    @property
    def vocab(self) -> int:
        """Return the vocabulary size."""
        return self.W.shape[0]

    @property
    def d_model(self) -> int:
        """Return the residual width."""
        return self.W.shape[1]

    def fingerprint(self) -> str:
        """Return sha256 hex (16 chars) of W_fold so saved banks know their model."""
        return self._fingerprint

    def forward(self, x: Tensor, with_bias: bool = False) -> Tensor:
        """Return logit-lens logits ``[..., vocab]`` for ``x [..., d_model]``."""
        out = F.linear(x.to(self.W.dtype), self.W)
        return out + self.b if with_bias else out


@dataclass
class LensConfig:
    """Hyper-parameters of a lens bank."""

    form: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dtype: str = "float32"
    objective: str = "joint"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not (math.isfinite(self.alpha) and self.alpha > 0)
        ):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    @property
    def scale(self) -> float:
        """Return the low-rank update scale ``alpha / rank`` (peft convention)."""
        return self.alpha / self.rank

    @property
    def torch_dtype(self) -> torch.dtype:
        """Return the parameter dtype as a torch dtype."""
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        """Return the config as a JSON-serialisable dict."""
        return asdict(self)


def _uniform_fan_in(shape: tuple[int, ...], fan_in: int, dtype: torch.dtype) -> Tensor:
    """Return U(-1/sqrt(fan_in), 1/sqrt(fan_in)) samples of ``shape``."""
    # Same bound as kaiming_uniform_(a=sqrt(5)) on nn.Linear(fan_in, r), i.e. peft's
    # default lora_A init; done by hand because kaiming on a stacked [H, r, d]
    # tensor would take fan_in = r * d.
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound)  # host: the same seed, the same init anywhere


class LensBank(nn.Module):
    """All heads' lenses of ONE layer, batched over heads (see module docstring)."""

    def __init__(
        self,
        unembed: FoldedUnembed,
        n_heads: int,
        config: LensConfig | None = None,
        layer: int | None = None,
    ) -> None:
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {n_heads}")
        self.config = config or LensConfig()
        self.unembed = unembed
        self.unembed.requires_grad_(False)
        self.n_heads = n_heads
        self.layer = layer
        cfg, H, V, d = self.config, n_heads, unembed.vocab, unembed.d_model
        dt, dev = cfg.torch_dtype, unembed.W.device
        self.bias = nn.Parameter(torch.zeros(H, V, dtype=dt, device=dev))
        if cfg.form == "full":
            self.weight = nn.Parameter(unembed.W.detach().to(dt).unsqueeze(0).repeat(H, 1, 1))
        elif cfg.form == "lora":
            self.lora_A = nn.Parameter(_uniform_fan_in((H, cfg.rank, d), d, dt))
            self.lora_B = nn.Parameter(torch.zeros(H, V, cfg.rank, dtype=dt, device=dev))
        else:
            self.res_U = nn.Parameter(torch.zeros(H, d, cfg.rank, dtype=dt, device=dev))
            self.res_V = nn.Parameter(_uniform_fan_in((H, cfg.rank, d), d, dt))
        self.to(dev)

    @property
    def vocab(self) -> int:
        """Return the vocabulary size."""
        return self.unembed.vocab

    @property
    def d_model(self) -> int:
        """Return the residual width."""
        return self.unembed.d_model

    @property
    def compute_dtype(self) -> torch.dtype:
        """Return the dtype the logits are computed in: fp32 for bf16/fp16 parameters, else the parameter dtype."""
        return compute_dtype(self.bias.dtype)

    def weights(self, upcast: Upcast | None = None) -> dict[str, Tensor]:
        """Return the tensors the logits are computed with, by parameter name: fp32/fp64 parameters themselves (no
        copy); bf16/fp16 ones as fp32 copies whose gradients `upcast` sums in fp32 over its whole forward pass (one
        `Upcast` per pass, shared by its loss chunks; None: this call alone)."""
        upcast = Upcast() if upcast is None else upcast
        return {name: upcast(p) for name, p in self.named_parameters(recurse=False)}

    def _check(self, x: Tensor) -> Tensor:
        """Return ``x`` cast to the compute dtype after a shape check."""
        if x.dim() != 3 or x.shape[1] != self.n_heads or x.shape[2] != self.d_model:
            raise ValueError(f"x must be [tokens, {self.n_heads}, {self.d_model}], got {tuple(x.shape)}")
        return x.to(self.compute_dtype)

    def _base(self, x: Tensor) -> Tensor:
        """Return frozen-base logits ``[..., vocab]`` in the compute dtype."""
        return self.unembed(x).to(self.compute_dtype)

    def head_logits(self, x: Tensor, base: Tensor | None = None, *, upcast: Upcast | None = None) -> Tensor:
        """Return per-head logits ``[tokens, heads, vocab]`` for ``x [tokens, heads, d_model]``.

        ``base``: optional precomputed logit lens ``W_fold @ x_h`` ``[tokens, heads, vocab]`` (lora only).
        ``upcast``: see :meth:`weights`.
        """
        x, w = self._check(x), self.weights(upcast)
        form, s = self.config.form, self.config.scale
        if form == "full":
            out = torch.einsum("thd,hvd->thv", x, w["weight"])
        elif form == "lora":
            ax = torch.einsum("thd,hrd->thr", x, w["lora_A"])
            base = self._base(x) if base is None else base.to(x.dtype)
            out = base + s * torch.einsum("thr,hvr->thv", ax, w["lora_B"])
        else:
            vx = torch.einsum("thd,hrd->thr", x, w["res_V"])
            out = self._base(x + s * torch.einsum("thr,hdr->thd", vx, w["res_U"]))
        return out + w["bias"]

    def layer_logits(self, x: Tensor, base: Tensor | None = None, *, upcast: Upcast | None = None) -> Tensor:
        """Return summed-over-heads logits ``[tokens, vocab]``; lora/residual never build ``[tokens, heads, vocab]``.

        ``base``: optional precomputed ``W_fold @ sum_h x_h`` ``[tokens, vocab]`` (lora only). It has no
        parameters, so a trainer can compute it once outside activation checkpointing instead of twice inside.
        ``upcast``: see :meth:`weights`.
        """
        x, w = self._check(x), self.weights(upcast)
        form, s = self.config.form, self.config.scale
        T, H, _ = x.shape
        bias = w["bias"].sum(0)
        if form == "full":
            # No shared base to collapse onto: a batched matmul + head sum beats
            # flattening (head, d_model), which would copy all H x [vocab, d_model]
            # weights every call. Only this baseline form builds [tokens, heads, vocab].
            return torch.einsum("thd,hvd->thv", x, w["weight"]).sum(1) + bias
        if form == "lora":
            r = self.config.rank
            ax = torch.einsum("thd,hrd->thr", x, w["lora_A"]).reshape(T, H * r)
            b = w["lora_B"].permute(1, 0, 2).reshape(self.vocab, H * r)
            # addmm fuses the scaled low-rank update into the base logits: one [tokens, vocab] buffer.
            base = self._base(x.sum(1)) if base is None else base.to(x.dtype)
            return torch.addmm(base + bias, ax, b.T, alpha=s)
        # Residual translators collapse in d_model space before the single projection.
        vx = torch.einsum("thd,hrd->thr", x, w["res_V"])
        moved = x.sum(1) + s * torch.einsum("thr,hdr->td", vx, w["res_U"])
        return self._base(moved) + bias

    def forward(self, x: Tensor, base: Tensor | None = None, target: ExactTarget | None = None,
                mask: Tensor | None = None, chunk: int = 256, *, upcast: Upcast | None = None) -> Tensor:
        """Return ``layer_logits`` for the joint objective, ``head_logits`` for per_head (``upcast``: see
        :meth:`weights`); given an exact ``target`` (lora only), the layer's loss instead, with ``mask`` ``[tokens]``:
        :func:`fused_lora_kl` of the layer logits (joint; ``base`` ``W_fold sum_h x_h`` ``[tokens, vocab]``) or
        :func:`fused_lora_kl_per_head` of each head's (per_head; ``base`` unused: each head's base is the bank's
        own fp32 unembedding of ``x_h``, as :meth:`head_logits` computes it).

        One entry point on purpose: ZeRO-3 gathers a bank's partitioned parameters in its forward hooks."""
        if target is not None:
            if self.config.form != "lora" or (self.config.objective == "joint" and base is None):
                raise ValueError("the fused loss needs the lora form (and the base logits for the joint objective)")
            w, r = self.weights(upcast), self.config.rank  # one use each: 16-bit gradients are rounded once
            x = self._check(x)
            ax = torch.einsum("thd,hrd->thr", x, w["lora_A"])  # [T, H, r]
            if self.config.objective == "per_head":
                return fused_lora_kl_per_head(ax, w["lora_B"], w["bias"], x, self.unembed.W, target, mask,
                                              self.config.scale, chunk)
            b = w["lora_B"].permute(1, 0, 2).reshape(self.vocab, self.n_heads * r)
            return fused_lora_kl(ax.reshape(len(x), self.n_heads * r), b, w["bias"].sum(0), base, target, mask,
                                 self.config.scale, chunk)
        if self.config.objective == "joint":
            return self.layer_logits(x, base, upcast=upcast)
        return self.head_logits(x, upcast=upcast)

    def trainable_parameters(self) -> int:
        """Return the number of trainable scalars in the bank (all heads)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def head_parameters(self, head: int) -> dict[str, Tensor]:
        """Return detached views of one head's parameters, keyed by parameter name."""
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head must be in [0, {self.n_heads}), got {head}")
        return {n: p.detach()[head] for n, p in self.named_parameters()}


def trainable_per_head(form: str, rank: int, d_model: int, vocab: int) -> int:
    """Return trainable scalars per head for ``form`` (bias included)."""
    LensConfig(form=form, rank=rank)
    if form == "full":
        return vocab * d_model + vocab
    if form == "lora":
        return rank * d_model + vocab * rank + vocab
    return 2 * rank * d_model + vocab
