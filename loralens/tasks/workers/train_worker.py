"""Process entry point of lens training: one per data-parallel rank.

Launched by the train task as `python -m loralens.tasks.workers.train_worker SPEC` (one process), under
`torchrun --nproc_per_node N -m loralens.tasks.workers.train_worker SPEC`, or by the `deepspeed` launcher
(`deepspeed [--hostfile H] --module loralens.tasks.workers.train_worker SPEC`). It wires the cache reader
(warehouse) to the trainer (lens); rank 0 then consolidates the lenses and hands them to every rank, and the
ranks evaluate them on their shares of the held-out prompts. Exit code 75 means: stopped by SIGTERM after a
checkpoint, re-run to resume.
"""

from __future__ import annotations

from loralens.lens.runtime.devices import resolve_device
from loralens.lens.training.deepspeed_loop import install_stop_handler

install_stop_handler()  # first: a SIGTERM during the slow imports below must not be lost

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from loralens.killpoints import maybe_kill  # noqa: E402
from loralens.lens.lenses.lens_set import FoldedUnembed, LensConfig  # noqa: E402
from loralens.lens.lenses.objective import LensSet  # noqa: E402
from loralens.lens.lenses.peft_io import save_bank  # noqa: E402
from loralens.lens.runtime.lean import load_lean  # noqa: E402
from loralens.lens.training import batches as lens_batches  # noqa: E402
from loralens.lens.training import checkpoints  # noqa: E402
from loralens.lens.training import deepspeed_loop as training  # noqa: E402
from loralens.lens.training.held_out import held_out_fidelity  # noqa: E402
from loralens.warehouse.activation_cache import read_h_final, read_layer_z, read_tokens  # noqa: E402
from loralens.warehouse.artifacts import ArtifactDir, atomic_write_bytes  # noqa: E402
from loralens.warehouse.constants import LENSES_DIR, TRAIN_CURVE, TRAIN_FIDELITY, TRAIN_RESULT  # noqa: E402

log = logging.getLogger("loralens.train")


class FrozenBase:
    """The frozen tensors every LensSet of this process shares, read once (lean: no model is built)."""

    def __init__(self, spec: dict) -> None:
        m = spec["model"]
        lean = load_lean(m["name"], Path(spec["home"]), spec["layers"], revision=m["revision"],
                         trust_remote_code=m["trust_remote_code"])
        parts = lean.parts.as_float32()  # one fp32 unembedding: the lm_head and the input of the fold
        del lean  # the stored-dtype (e.g. bf16) tensors
        self.unembed = FoldedUnembed(*parts.folded())
        self.w_o = torch.stack([parts.w_o(layer) for layer in spec["layers"]])  # [L, H, d_head, d]
        self.lm_head, self.lm_head_bias = parts.lm_head()  # fp32: the exact loss recomputes the model's logits
        base_dtype = getattr(torch, spec["train"]["base_dtype"])  # the training GEMM's copy, made once
        self.w_base = self.unembed.W if self.unembed.W.dtype == base_dtype else self.unembed.W.to(base_dtype)


def build_lens_set(spec: dict, base: FrozenBase) -> LensSet:
    """Return an untrained LensSet for the spec's layers over the shared frozen base (no tensor copied)."""
    t = spec["train"]
    lens_cfg = LensConfig(form=t["form"], rank=t["rank"], alpha=t["alpha"], dtype="float32",
                          objective=t["objective"])
    # A module of its own over the shared tensors: the DeepSpeed engine wraps (and may hook) the trained set.
    unembed = FoldedUnembed(base.unembed.W, base.unembed.b, fingerprint=base.unembed.fingerprint())
    return LensSet(unembed, base.w_o, spec["layers"], lens_cfg, lm_head=base.lm_head,
                   lm_head_bias=base.lm_head_bias, loss=t["loss"], chunk=t["loss_chunk"], base_dtype=t["base_dtype"],
                   w_base=base.w_base)


def shard_loader(cache: ArtifactDir, layers: list[int], z_width: int, d_model: int) -> lens_batches.ShardLoader:
    """Return shard index -> ShardData, reading one shard's tokens and every trained layer's z."""

    def load(shard: int) -> lens_batches.ShardData:
        tokens = read_tokens(cache, [shard])
        z = np.stack([read_layer_z(cache, layer, z_width, [shard]) for layer in layers], axis=1)
        return lens_batches.ShardData(
            z=z,
            scale=tokens.column("scale").to_numpy(),
            h_final=read_h_final(tokens, d_model),
            topk_ids=_fixed_lists(tokens, "topk_ids"),
            topk_logprobs=_fixed_lists(tokens, "topk_logprobs"),
            prompt_idx=tokens.column("prompt_idx").to_numpy(),
        )

    return load


def _fixed_lists(tokens, column: str) -> np.ndarray | None:
    """Return a fixed-size list column as `[n, k]`, or None when the cache did not store it (exact loss)."""
    if column not in tokens.column_names:
        return None
    col = tokens.column(column).combine_chunks()
    return col.values.to_numpy().reshape(len(col), -1)


def rows_per_shard(cache: ArtifactDir, shards: list[int], every: int, held_out: bool) -> dict[int, int]:
    """Return the number of training (or held-out) rows of each shard (reads only the prompt_idx column)."""
    out = {}
    for s in shards:
        idx = read_tokens(cache, [s], columns=["prompt_idx"]).column("prompt_idx").to_numpy()
        out[s] = int((lens_batches.is_held_out(idx, every) == held_out).sum())
    return out



def evaluate(lens_set: LensSet, loader, shards: list[int], spec: dict, cache: ArtifactDir,
             device: torch.device, rank: int = 0, world: int = 1) -> dict:
    """Return held-out fidelity (exact KL, lens vs logit lens) and the subset KL of the layer read-outs, computed
    on `device`, every rank of the process group evaluating the held-out prompts of its own shards (the sums are
    all-reduced: every rank returns the result one process would compute)."""
    t = spec["train"]
    every, micro_batch = t["eval_every_nth_prompt"], t["micro_batch_tokens"]
    # Streamed: one shard's rows at a time (the total is counted from the prompt_idx column alone).
    held_out = rows_per_shard(cache, lens_batches.rank_shards(shards, rank, world), every, held_out=True)
    total = sum(-(-n // micro_batch) for n in held_out.values())
    bar = lambda batches: tqdm(batches, total=total, desc="evaluate", unit="batch", disable=rank != 0)  # noqa: E731
    return held_out_fidelity(lens_set, loader, shards, every=every, micro_batch=micro_batch,
                             store_dtype=spec["store_dtype"], device=device, progress=bar)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(args.spec).read_text())
    t = spec["train"]
    device = resolve_device(spec["model"]["device"])  # plain "cuda": LOCAL_RANK's GPU, one process per GPU
    training.setup_process_env(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts: each rank's communicator lives on its own GPU
    rank, world = training.init_distributed(device)

    out = Path(spec["out_dir"])
    cache = ArtifactDir(Path(spec["home"]), "cache", spec["cache_version"])
    shards = sorted(cache.done_shards())
    loader = shard_loader(cache, spec["layers"], spec["z_width"], spec["d_model"])
    train_spec = training.TrainSpec(
        shards=shards, train_rows=rows_per_shard(cache, shards, t["eval_every_nth_prompt"], held_out=False),
        store_dtype=spec["store_dtype"], micro_batch=t["micro_batch_tokens"], epochs=t["epochs"],
        max_steps=t["max_steps"], lr=t["lr"], weight_decay=t["weight_decay"], zero_stage=t["zero_stage"],
        seed=t["seed"], every=t["eval_every_nth_prompt"], checkpoint_every=t["checkpoint_every"],
        bf16=t["param_dtype"] == "bfloat16", grad_accum=t["grad_accum_steps"], log_every=t["log_every"],
        checkpoint_minutes=t["checkpoint_minutes"], tf32=t["tf32"],
    )
    base = FrozenBase(spec)
    torch.manual_seed(t["seed"])  # lora_A's random init is part of the versioned result
    lens_set = build_lens_set(spec, base)
    curve = (out / TRAIN_CURVE).open("a") if rank == 0 else None
    bar = tqdm(desc="train", unit="step", disable=rank != 0)

    def on_log(step: int, loss: float, tokens: int) -> None:  # a row: the mean since the previous row
        if curve is not None:
            curve.write(json.dumps({"step": step, "loss": loss, "tokens": tokens}) + "\n")
            curve.flush()

    def progress(step: int, total: int) -> None:
        bar.total = total
        bar.update(step - bar.n)

    ckpt_dir = out / "checkpoints"
    result, engine = training.train(lens_set, loader, train_spec, ckpt_dir, device=device, on_log=on_log,
                                    progress=progress)
    bar.close()
    if result.stopped:
        log.warning("stopped by SIGTERM at step %d after a checkpoint; re-run to resume", result.steps)
        return training.STOP_EXIT_CODE

    # Consolidate into a plain, world-size-independent fp32 LensSet on rank 0 (from the checkpoint; bf16 lenses: from
    # the optimizer's fp32 masters, never their bf16 rounding), handed to every rank for the held-out evaluation;
    # rank 0 saves one fp32 bank per layer.
    state = checkpoints.final_state(engine, ckpt_dir, result.final_tag, t["zero_stage"], bf16=train_spec.bf16,
                                    rank=rank)
    # Free the optimizer states and the training copy of the banks (DeepSpeed keeps references of its own):
    # evaluation, the process's other peak, holds only the consolidated lenses over the shared frozen base.
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, lens_set
    gc.collect()
    state = checkpoints.rank0_state(state, device)
    final = build_lens_set(spec, base)
    final.load_state_dict(state, strict=False)  # non-persistent buffers (bases) are rebuilt, not loaded
    del state
    final.eval()
    if rank == 0:
        tmp = out / f".tmp-{LENSES_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        for i, layer in enumerate(spec["layers"]):
            save_bank(final.banks[i], tmp / f"layer={layer}")
        maybe_kill("train.mid_lens_save")  # the banks are in the temp folder, not yet renamed
        shutil.rmtree(out / LENSES_DIR, ignore_errors=True)
        os.replace(tmp, out / LENSES_DIR)

    fid = evaluate(final, loader, shards, spec, cache, device, rank, world)
    if rank != 0:
        return 0
    (out / TRAIN_FIDELITY).write_text(json.dumps(fid))
    summary = {"steps": result.steps, "resumed_from": result.resumed_from, "world_size": world,
               "grad_accum_steps": train_spec.grad_accum,
               "train_tokens": result.steps * train_spec.micro_batch * world * train_spec.grad_accum,
               "train_seconds": result.seconds, "train_timing": result.timing, "tf32": result.tf32,
               "tokens_per_s": result.tokens_per_rank * world / max(result.seconds, 1e-9),
               "trainable_params": sum(p.numel() for p in final.parameters() if p.requires_grad),
               "heads": len(spec["layers"]) * final.w_o.shape[1],
               "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    maybe_kill("train.before_result")
    atomic_write_bytes(out / TRAIN_RESULT, json.dumps(summary).encode())  # its presence means: training done
    return 0


if __name__ == "__main__":
    sys.exit(main())
