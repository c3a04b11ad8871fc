"""fp32 lens math for 16-bit (bf16/fp16) lens parameters, their gradients summed in fp32 over a forward pass.

The training loss calls a bank once per checkpointed loss chunk, so one micro-batch uses each parameter many times.
Autograd sums the gradients of several uses of one leaf in the leaf's dtype: bf16 parameters used directly would
have their chunks' gradients summed in bf16, rounding at every chunk. Here each use computes in fp32 from an fp32
copy of the parameter (made per use: nothing stays alive between chunks), and every use's gradient flows into ONE
per-parameter *sink*: stride-0 fp32 zeros shaped like the parameter (no memory), created at the pass's first use.
Autograd sums the uses' fp32 gradients in the sink's input buffer; the sink's backward casts that sum to the
parameter's dtype once, so the leaf's `.grad` is the pass's fp32 gradient rounded once. DeepSpeed ZeRO-2/3 hook the
leaf's gradient accumulation (`register_post_accumulate_grad_hook`), which still fires once per backward pass, now
with that single rounding; its fp32 accumulation across micro-batches (`data_types.grad_accum_dtype`) follows.

fp32 and fp64 parameters are returned as they are: no copy, no sink, the same graph as without this module.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype lens math runs in for parameters of `dtype`: fp32 for bf16/fp16, else `dtype` itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


class _GradSink(torch.autograd.Function):
    """Parameter `[*shape]` -> fp32 zeros `[*shape]` (a stride-0 view of one scalar); backward casts the summed fp32
    gradient to the parameter's dtype."""

    @staticmethod
    def forward(ctx, param: Tensor) -> Tensor:
        ctx.dtype = param.dtype
        return torch.zeros((), dtype=torch.float32, device=param.device).expand(param.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.to(ctx.dtype)


class Upcast:
    """The parameters one forward pass computes with: 16-bit ones as fp32 copies whose gradients are summed in fp32
    (one sink per parameter for the whole pass; see the module docstring), fp32/fp64 ones as themselves.

    Make one per pass and hand it to every use of the parameters in that pass, activation-checkpoint recomputations
    included (they then reuse the pass's sinks). Under ZeRO-3 call it inside the module's forward, where the
    parameters are gathered.
    """

    def __init__(self) -> None:
        self._sinks: dict[int, Tensor] = {}  # id(parameter) -> its sink

    def __call__(self, param: Tensor) -> Tensor:
        """Return `param` itself when fp32/fp64; else its values in fp32 (a new tensor), differentiable through this
        pass's sink when `param` requires grad and autograd is on."""
        if param.dtype not in LOW_PRECISION:
            return param
        if not (param.requires_grad and torch.is_grad_enabled()):
            return param.float()
        sink = self._sinks.get(id(param))
        if sink is None:
            sink = self._sinks[id(param)] = _GradSink.apply(param)
        return torch.add(sink, param.detach())  # fp32 (type promotion); the gradient goes to the sink alone
