"""The memory plan of a lens training job: its sizes, derived totals and the table rows `loralens plan` prints.

The formulas that fill it are in `loralens.lens.memory.training_plan`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MemoryPlan:
    """Sizes of one lens training job; bytes are per data-parallel rank unless named per token."""

    # parameters (counts)
    params_per_head: int
    params_per_layer: int
    params_total: int
    # frozen base, replicated on every rank
    frozen_unembed_bytes: int
    frozen_w_o_bytes: int
    frozen_lm_head_bytes: int
    # training state
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    step_transient_bytes: int
    # one micro-batch
    batch_bytes: int
    act_inputs_bytes: int
    act_targets_bytes: int
    act_base_bytes: int
    act_chunk_bytes: int
    act_lowrank_bytes: int
    act_upcast_bytes: int  # fp32 copies of one layer's 16-bit parameters, one chunk at a time (0 for fp32)
    act_grad_accum_bytes: int
    act_held_grad_bytes: int  # the fused loss's gradients, held from each layer's forward to its backward
    activation_bytes: int
    # cache
    cache_z_bytes_per_token: int
    cache_target_bytes_per_token: int
    cache_meta_bytes_per_token: int

    @property
    def frozen_bytes(self) -> int:
        """Return the bytes of all frozen base tensors."""
        return self.frozen_unembed_bytes + self.frozen_w_o_bytes + self.frozen_lm_head_bytes

    @property
    def state_bytes(self) -> int:
        """Return parameter + gradient + optimizer-state bytes."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def peak_bytes(self) -> int:
        """Return the step's peak: everything resident plus the larger of backward and optimizer-step transients."""
        # Gradients are alive both at the backward peak and during the step, so they sit in the base.
        return (self.frozen_bytes + self.batch_bytes + self.state_bytes
                + max(self.activation_bytes, self.step_transient_bytes))

    @property
    def cache_bytes_per_token(self) -> int:
        """Return the uncompressed cache bytes one token adds (z of the trained layers + target + metadata)."""
        return self.cache_z_bytes_per_token + self.cache_target_bytes_per_token + self.cache_meta_bytes_per_token

    def to_dict(self) -> dict[str, int]:
        """Return every field and derived total as a JSON-serialisable dict."""
        derived = ("frozen_bytes", "state_bytes", "peak_bytes", "cache_bytes_per_token")
        return asdict(self) | {k: getattr(self, k) for k in derived}

    def rows(self) -> list[tuple[str, str, int, str]]:
        """Return ``(section, item, value, unit)`` rows for a table; unit is 'params' or 'bytes'."""
        P, B = "params", "bytes"
        return [
            ("parameters", "per head", self.params_per_head, P),
            ("parameters", "per layer", self.params_per_layer, P),
            ("parameters", "total", self.params_total, P),
            ("frozen", "folded unembedding", self.frozen_unembed_bytes, B),
            ("frozen", "W_O", self.frozen_w_o_bytes, B),
            ("frozen", "lm_head (exact loss)", self.frozen_lm_head_bytes, B),
            ("state", "parameters", self.param_bytes, B),
            ("state", "gradients", self.grad_bytes, B),
            ("state", "optimizer (AdamW)", self.optimizer_bytes, B),
            ("state", "optimizer step transient", self.step_transient_bytes, B),
            ("micro-batch", "batch tensors", self.batch_bytes, B),
            ("micro-batch", "lens inputs x", self.act_inputs_bytes, B),
            ("micro-batch", "target logits (exact)", self.act_targets_bytes, B),
            ("micro-batch", "precomputed base logits (lora joint)", self.act_base_bytes, B),
            ("micro-batch", "logits chunk peak", self.act_chunk_bytes, B),
            ("micro-batch", "low-rank intermediates", self.act_lowrank_bytes, B),
            ("micro-batch", "fp32 copy of a layer's bf16 weights", self.act_upcast_bytes, B),
            ("micro-batch", "grad accumulation", self.act_grad_accum_bytes, B),
            ("micro-batch", "held gradients (fused loss)", self.act_held_grad_bytes, B),
            ("micro-batch", "activations total", self.activation_bytes, B),
            ("total", "peak per rank", self.peak_bytes, B),
            ("cache", "z per token", self.cache_z_bytes_per_token, B),
            ("cache", "target per token", self.cache_target_bytes_per_token, B),
            ("cache", "metadata per token", self.cache_meta_bytes_per_token, B),
            ("cache", "total per token", self.cache_bytes_per_token, B),
        ]
