"""The sections of the lens stages: `train` (fit a lens per head) and `decode` (read every head through it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loralens.config.base import Section, execution_field


class TrainConfig(Section):
    """How the `train` stage fits a lens for every head of the cached layers."""

    form: Literal["lora", "residual", "full"] = Field("lora", description="the lens's parametrisation per head")
    rank: int = Field(4, gt=0, description="rank of a lora / residual lens")
    alpha: float = Field(8.0, gt=0, description="lora scaling numerator (the update is scaled by alpha / rank)")
    objective: Literal["joint", "per_head"] = Field(
        "joint", description="joint: the heads' lenses are fitted together; per_head: each on its own")
    # exact: the target is recomputed once per step and shared by every layer, so it costs ~1/L more
    # than subset; subset leaves the lens's within-tail shape unconstrained (see README).
    loss: Literal["exact", "subset"] = Field(
        "exact", description="exact: full-vocabulary KL to the model; subset: over the cached target top-k")
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the trained lens weights (bfloat16: fp32 gradient accumulation and fp32 "
        "master weights, saved as fp32; needs zero_stage 2 or 3)")
    base_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="dtype of the frozen base projection in training (targets/eval stay fp32)")
    lr: float = Field(2e-2, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    epochs: int = Field(2, gt=0, description="passes over the cached training tokens")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    micro_batch_tokens: int = Field(256, gt=0, description="tokens per rank per micro-batch (with world_size and "
                                    "grad_accum_steps: the batch of one optimizer step)")
    grad_accum_steps: int = Field(
        1, gt=0, description="micro-batches per optimizer step (gradient accumulation): an optimizer step sees "
        "micro_batch_tokens x world_size x grad_accum_steps tokens; max_steps and checkpoint_every count optimizer "
        "steps (hashed only when not 1, so versions from before the setting stay valid)")
    loss_chunk: int = execution_field(128, gt=0, description="tokens per chunk of lens logits (bounds memory)")
    eval_every_nth_prompt: int = Field(10, gt=1, description="prompts with index % n == 0 are held out")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage (hashed: a checkpoint resumes only under the stage that wrote it)")
    world_size: int = Field(1, gt=0, description="data-parallel processes (hashed: it multiplies the batch)")
    seed: int = Field(0, description="seed of the lens initialisation and the data order")
    checkpoint_every: int = execution_field(20, gt=0, description="optimizer steps between resumable checkpoints")
    checkpoint_minutes: float | None = execution_field(
        10.0, gt=0, description="also checkpoint when this many minutes passed since the last checkpoint (rank 0's "
        "clock decides for every rank; checked every log_every steps); null: by checkpoint_every alone")
    log_every: int = execution_field(
        10, gt=0, description="optimizer steps per training-curve row: the loss is summed on the device and read "
        "once per interval (a row is the mean over the interval's micro-batches and ranks); SIGTERM and "
        "checkpoint_minutes are also checked at these points")
    tf32: bool = execution_field(
        True, description="on Ampere or newer GPUs, fp32 matmuls of the training loop use TF32 (faster; changes "
        "rounding, not the method; held-out evaluation stays full fp32); no effect on CPU")
    launcher: Literal["auto", "torchrun", "deepspeed"] = execution_field(
        "auto", description="how the training processes start (auto: plain for one process, else torchrun)")
    hostfile: str | None = execution_field(None, description="DeepSpeed hostfile for a multi-node run")


class DecodeConfig(Section):
    """Which positions the `decode` stage reads each head at, and how many tokens it keeps."""

    top_k: int = Field(10, gt=0, le=1000, description="decoded tokens kept per head and position")
    positions: Literal["last", "all"] = Field("last", description="last prompt token, or every cached token")
    chunk_tokens: int = execution_field(32, gt=0, description="positions per batch of [tokens, heads, vocab] logits")
