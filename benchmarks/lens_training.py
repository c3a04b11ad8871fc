"""P2-P4: the cost of training lenses at real model sizes, with random weights (no model is loaded).

- P2: trainable parameters per head, lora and residual vs full (goal <= 1/100), at rank 4 and 8.
- P3: one training step (forward + backward + AdamW step) of `lora` vs `full` on the same heads and
  batches (one SmolLM2-sized layer, 9 heads): peak memory (goal <= 0.2x), time (goal <= 0.5x), and the
  exact held-out KL after the same number of tokens on a learnable synthetic target (goal <= 1.1x full's).
- P4: achieved matmul FLOP rate of the lora step / the measured fp32 matmul peak of this machine (goal >= 0.5):
  on P3's one-layer subset step, and on the train stage's default job (all 30 layers, exact loss, bf16 base,
  `loss_chunk` 128, 256 tokens) with the fused loss (`lens/lenses/fused_kl.py`) vs the checkpointed chunks,
  timed alternately in one run; also against a dtype-matched roofline (the bf16 base GEMMs at the bf16 peak).
- Throughput: tokens/s training ALL 270 SmolLM2 heads (30 layers x 9) with each loss (lora, joint, rank 4).
- `--loop` (alone): the DeepSpeed loop itself (`lens/training/deepspeed_loop.train`, one process on gloo, ZeRO 2,
  exact loss, one SmolLM2-sized layer) and where its host time goes per optimizer step: waiting for a batch (read),
  forward/backward/step (compute), the sync points' all-reduce and host read (sync), checkpoint saves, under
  `log_every` 1 (a host read every step, as the loop did before `train.log_every`) vs 10, and grad_accum 2.

Prints a table, writes JSON. Never a timed test: run it by hand on an idle machine.

    python benchmarks/lens_training.py [--quick] [--threads N] [--out benchmarks/results]
    python benchmarks/lens_training.py --loop [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from loralens.lens.heads.hooks import head_contributions
from loralens.lens.lenses.lens_set import FoldedUnembed, LensBank, LensConfig, trainable_per_head
from loralens.lens.lenses.losses import kl_exact
from loralens.lens.lenses.objective import LensBatch, LensSet
from loralens.lens.memory.probe import LiveBytes
from loralens.lens.memory.training_plan import plan_memory
from loralens.lens.runtime.adapters import ModelDims

MODELS = {
    "SmolLM2-135M": ModelDims(n_layers=30, n_heads=9, d_head=64, d_model=576, vocab=49152),
    "GPT-2-small": ModelDims(n_layers=12, n_heads=12, d_head=64, d_model=768, vocab=50257),
}
SMOL = MODELS["SmolLM2-135M"]
TOP_K = 64
CHUNK = 256
# Per-form Adam learning rates: each form's best of {1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2} after 20 steps on
# this very task at vocab 8192, confirmed at 49152 over 10 steps (full at 1e-3 overshoots). LoRA usually
# wants a ~10-30x larger rate than full fine-tuning; one shared rate would only measure that mismatch.
LR = {"lora": 1e-2, "full": 3e-4}
GOALS = {"p2_ratio": 0.01, "p3_memory": 0.2, "p3_time": 0.5, "p3_kl": 1.1, "p4_peak_fraction": 0.5}


# -- measuring ---------------------------------------------------------------------------------------
def nbytes(tensors) -> int:
    """Return the summed bytes of the tensors among `tensors`."""
    return sum(t.nbytes for t in tensors if isinstance(t, Tensor))


def matmul_peak_flops(n: int = 2048, reps: int = 8, dtype: torch.dtype = torch.float32) -> float:
    """Return the best measured `torch.mm` rate of ``[n, n] @ [n, n]`` in `dtype`, in FLOP/s."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool and packing buffers
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_matmul_flops(dims: ModelDims, lens: LensConfig, tokens: int, chunk: int, n_layers: int) -> int:
    """Return the matmul FLOPs of one joint-objective LensSet step: inputs, forward, checkpoint recompute, backward.

    Per layer: inputs ``2 T H dh d`` (z_h W_O). lora: the frozen base logits of the head sum ``2 T d V``,
    once per layer outside checkpointing; per chunk of ``c`` tokens the low-rank forward
    ``F = 2c (H d r + H r V)`` (A x, the fused update), run twice (forward + recompute), backward
    ``2c (2 H r V + H r d)`` (addmm's two operand gradients, A's gradient; nothing flows into x or the
    frozen base). full: ``F = 2c H d V``, twice, backward ``F`` (weight only).
    """
    H, d, r, V = dims.n_heads, dims.d_model, lens.rank, dims.vocab
    total = 2 * tokens * d * V if lens.form == "lora" else 0
    for start in range(0, tokens, chunk):
        c = min(chunk, tokens - start)
        if lens.form == "lora":
            total += 2 * 2 * c * (H * d * r + H * r * V) + 2 * c * (2 * H * r * V + H * r * d)
        elif lens.form == "full":
            total += 3 * 2 * c * H * d * V
        else:
            raise ValueError(f"no FLOP count for form {lens.form!r}")
    return n_layers * (total + 2 * tokens * H * dims.d_head * d)


# -- a learnable synthetic task at real sizes ---------------------------------------------------------
@dataclass
class Task:
    """Random frozen base for `layers` layers and a hidden lora lens whose read-out is the target."""

    dims: ModelDims
    unembed: FoldedUnembed
    w_o: Tensor  # [L, heads, d_head, d_model]
    lm_head: Tensor  # [vocab, d_model], for exact targets
    hidden: LensBank  # the target: a random low-rank perturbation of the logit lens (layer 0's inputs)


def make_task(dims: ModelDims, n_layers: int, seed: int = 0) -> Task:
    """Return a task whose base logits have std ~3 and whose hidden perturbation moves them by ~1.5."""
    g = torch.Generator().manual_seed(seed)
    d = dims.d_model
    unembed = FoldedUnembed(torch.randn(dims.vocab, d, generator=g) / d**0.5)
    w_o = torch.randn(n_layers, dims.n_heads, dims.d_head, d, generator=g) / dims.d_head**0.5
    lm_head = torch.randn(dims.vocab, d, generator=g) / d**0.5
    torch.manual_seed(seed + 1)
    hidden = LensBank(unembed, dims.n_heads, LensConfig(form="lora", rank=4, alpha=8.0))
    with torch.no_grad():
        hidden.lora_B.normal_(0.0, 0.2, generator=g)
        hidden.bias.normal_(0.0, 0.3, generator=g)
    return Task(dims, unembed, w_o, lm_head, hidden)


def make_batch(task: Task, tokens: int, seed: int, loss: str = "subset") -> tuple[LensBatch, Tensor]:
    """Return a micro-batch and its exact target logits ``[tokens, vocab]`` (the hidden lens on layer 0)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    n_layers, width = task.w_o.shape[0], task.dims.z_width
    batch = LensBatch(z=torch.randn(tokens, n_layers, width, generator=g).half(),
                      scale=0.8 + 0.4 * torch.rand(tokens, generator=g), mask=torch.ones(tokens, dtype=torch.bool))
    with torch.no_grad():
        x = head_contributions(batch.z[:, 0].float(), task.w_o[0]) / batch.scale[:, None, None]  # as LensSet.inputs
        target = task.hidden.layer_logits(x)
        top = torch.log_softmax(target, -1).topk(TOP_K, dim=-1)
    batch.topk_ids, batch.topk_logprobs = top.indices, top.values
    if loss == "exact":
        # h_final whose lm_head logits ARE the target would need a solve; exact-loss timing needs only shapes.
        batch.h_final = torch.randn(tokens, task.dims.d_model, generator=g)
    return batch, target


def lens_set(task: Task, form: str, loss: str = "subset", n_layers: int = 1, base_dtype: str = "float32") -> LensSet:
    """Return a fresh LensSet (rank 4, alpha 8, joint) over the task's first `n_layers` layers."""
    torch.manual_seed(2)
    config = LensConfig(form=form, rank=4, alpha=8.0, objective="joint")
    return LensSet(task.unembed, task.w_o[:n_layers], list(range(n_layers)), config,
                   lm_head=task.lm_head if loss == "exact" else None, loss=loss, chunk=CHUNK, base_dtype=base_dtype)


def adamw(model: LensSet, lr: float) -> torch.optim.AdamW:
    """Return AdamW over the trainable parameters; foreach (the GPU default), no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)


def train_step(model: LensSet, opt: torch.optim.Optimizer, batch: LensBatch) -> None:
    """Run one training step: forward, backward, AdamW step."""
    model(batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# -- the measurements ----------------------------------------------------------------------------------
def p2_rows() -> list[dict]:
    """Return trainable parameters per head of lora/residual vs full for each model and rank."""
    rows = []
    for (name, dims), rank, form in itertools.product(MODELS.items(), (4, 8), ("lora", "residual")):
        full = trainable_per_head("full", rank, dims.d_model, dims.vocab)
        ours = trainable_per_head(form, rank, dims.d_model, dims.vocab)
        rows.append({"model": name, "form": form, "rank": rank, "alpha": 2.0 * rank, "per_head": ours,
                     "full_per_head": full, "ratio": ours / full, "ok": ours / full <= GOALS["p2_ratio"]})
    return rows


def p3_run(task: Task, form: str, steps: int, tokens: int, held: tuple[LensBatch, Tensor]) -> dict:
    """Return memory, step times and held-out KL of training one layer's lenses of `form` for `steps` steps.

    Step 0 is the warm-up; step 1 runs under the memory tracker (steady state: AdamW states exist);
    the rest are timed. Every form sees the same batches in the same order.
    """
    model = lens_set(task, form)
    opt = adamw(model, LR[form])
    assert model.banks[0].trainable_parameters() == task.dims.n_heads * trainable_per_head(
        form, 4, task.dims.d_model, task.dims.vocab)
    held_batch, held_target = held
    kl0 = held_kl(model, held_batch, held_target)
    times, peak = [], None
    for step in range(steps):
        batch, _ = make_batch(task, tokens, step)
        if step == 1:
            resident = (nbytes(model.parameters()) + nbytes(model.buffers()) + nbytes(batch.__dict__.values())
                        + nbytes(v for s in opt.state.values() for v in s.values()))
            with LiveBytes() as tracker:
                train_step(model, opt, batch)
            peak = resident + tracker.peak()
        else:
            seconds = _seconds(lambda b=batch: train_step(model, opt, b))
            if step > 0:
                times.append(seconds)
    dims1 = ModelDims(1, task.dims.n_heads, task.dims.d_head, task.dims.d_model, task.dims.vocab)
    planned = plan_memory(dims1, model.config, micro_batch_tokens=tokens, top_k=TOP_K, chunk=CHUNK, zero_stage=0)
    return {"form": form, "lr": LR[form], "steps": steps, "tokens_seen": steps * tokens,
            "params": model.banks[0].trainable_parameters(), "peak_bytes": peak,
            "planned_peak_bytes": planned.peak_bytes, "step_s": statistics.median(times), "step_times_s": times,
            "kl_start": kl0, "kl_end": held_kl(model, held_batch, held_target)}


@torch.no_grad()
def held_kl(model: LensSet, batch: LensBatch, target: Tensor) -> float:
    """Return the exact mean KL(target || lens) on held-out tokens."""
    return float(kl_exact(target, model.banks[0].layer_logits(model.inputs(batch, 0)), chunk=64))


def p4_counted_flops(task: Task, tokens: int) -> int:
    """Return the matmul FLOPs torch's FlopCounterMode sees in one lora step (checks the analytic count)."""
    model = lens_set(task, "lora")
    batch, _ = make_batch(task, tokens, 0)
    with FlopCounterMode(display=False) as counter:
        model(batch).backward()
    return counter.get_total_flops()


def throughput(task: Task, loss: str, tokens: int, steps: int, base_dtype: str) -> dict:
    """Return tokens/s of training all heads of all task layers with `loss` (one warm-up, then `steps`)."""
    n_layers = task.w_o.shape[0]
    model = lens_set(task, "lora", loss=loss, n_layers=n_layers, base_dtype=base_dtype)
    opt = adamw(model, LR["lora"])
    batches = [make_batch(task, tokens, s, loss)[0] for s in range(steps + 1)]
    train_step(model, opt, batches[0])
    seconds = sum(_seconds(lambda b=b: train_step(model, opt, b)) for b in batches[1:])
    flops = step_matmul_flops(task.dims, model.config, tokens, CHUNK, n_layers) * steps
    return {"loss": loss, "base_dtype": base_dtype, "heads": n_layers * task.dims.n_heads,
            "micro_batch_tokens": tokens, "steps": steps,
            "seconds": seconds, "tokens_per_s": tokens * steps / seconds, "matmul_flops_per_s": flops / seconds}


DEFAULT_CHUNK = 128  # train.loss_chunk's default


def default_job_flops(dims: ModelDims, rank: int, tokens: int, n_layers: int) -> dict[str, int]:
    """Return the useful matmul FLOPs of one default-job step (exact loss; what the fused path runs), by dtype.

    bf16: each layer's frozen base ``2 T d V``. fp32: the exact target ``2 T d V`` once; per layer the inputs
    ``2 T H dh d``, ``A x`` and its weight gradient ``2 x 2 T H d r``, and on ``[T, vocab]`` the low-rank update, the
    gradients of ``B`` and of ``A x``: ``3 x 2 T H r V``. (The checkpointed path also recomputes each chunk's
    forward: more FLOPs, the same useful work.)
    """
    H, d, V = dims.n_heads, dims.d_model, dims.vocab
    per_layer = 2 * tokens * H * dims.d_head * d + 4 * tokens * H * d * rank + 6 * tokens * H * rank * V
    return {"bf16": n_layers * 2 * tokens * d * V, "fp32": 2 * tokens * d * V + n_layers * per_layer}


def time_alternately(task: Task, sets: dict, steps: int, tokens: int, desc: str) -> dict:
    """Return key -> training-step seconds of each LensSet of `sets` (lora lr, AdamW), all stepped on the same
    exact-loss batches in turn, `steps` steps after one warm-up step (optimizer states, allocator)."""
    opts = {k: adamw(m, LR["lora"]) for k, m in sets.items()}
    times: dict = {k: [] for k in sets}
    for step in tqdm(range(steps + 1), desc=desc):
        batch = make_batch(task, tokens, step, "exact")[0]
        for key, model in sets.items():
            seconds = _seconds(lambda m=model, o=opts[key], b=batch: train_step(m, o, b))
            if step > 0:
                times[key].append(seconds)
    return times


def p4_default(task: Task, steps: int, tokens: int = 256) -> dict:
    """Return step times of the train stage's default job, fused loss vs checkpointed chunks, timed alternately."""
    n_layers = task.w_o.shape[0]
    config = LensConfig(form="lora", rank=4, alpha=8.0, objective="joint")
    sets = {}
    for fused in (True, False):
        torch.manual_seed(2)
        sets[fused] = LensSet(task.unembed, task.w_o, list(range(n_layers)), config, lm_head=task.lm_head,
                              loss="exact", chunk=DEFAULT_CHUNK, base_dtype="bfloat16", fused=fused)
    times = time_alternately(task, sets, steps, tokens, "P4 default job (fused, checkpointed)")
    flops = default_job_flops(task.dims, 4, tokens, n_layers)
    return {"layers": n_layers, "heads": n_layers * task.dims.n_heads, "micro_batch_tokens": tokens,
            "loss_chunk": DEFAULT_CHUNK, "steps": steps, "matmul_flops": flops,
            "fused_step_s": statistics.median(times[True]), "checkpointed_step_s": statistics.median(times[False]),
            "fused_step_times_s": times[True], "checkpointed_step_times_s": times[False]}


def per_head_costs(task: Task, steps: int, tokens: int = 256) -> dict:
    """Return step times of the per_head objective, fused (`fused_lora_kl_per_head`) vs checkpointed, beside the
    default joint job (fused), on the same batches, timed alternately (rank 4, exact, `loss_chunk` 128; the joint job's
    base in bf16, per_head's in fp32 as `head_logits` compute it on either path)."""
    n_layers = task.w_o.shape[0]
    jobs = {"joint fused": ("joint", True), "per_head fused": ("per_head", True),
            "per_head checkpointed": ("per_head", False)}
    sets = {}
    for name, (objective, fused) in jobs.items():
        torch.manual_seed(2)
        sets[name] = LensSet(task.unembed, task.w_o, list(range(n_layers)),
                             LensConfig(form="lora", rank=4, alpha=8.0, objective=objective), lm_head=task.lm_head,
                             loss="exact", chunk=DEFAULT_CHUNK, base_dtype="bfloat16", fused=fused)
    times = time_alternately(task, sets, steps, tokens, "per_head: fused, checkpointed (and joint)")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"layers": n_layers, "heads": n_layers * task.dims.n_heads, "micro_batch_tokens": tokens,
            "loss_chunk": DEFAULT_CHUNK, "steps": steps, "step_s": med, "step_times_s": times,
            "per_head_fused_over_joint": med["per_head fused"] / med["joint fused"],
            "per_head_checkpointed_over_joint": med["per_head checkpointed"] / med["joint fused"],
            "speedup": med["per_head checkpointed"] / med["per_head fused"]}


def per_head_main(args: argparse.Namespace) -> None:
    """Measure `per_head_costs` on `--per-head-layers` SmolLM2 layers; print a table, write the JSON."""
    t0 = time.perf_counter()
    res = per_head_costs(make_task(SMOL, n_layers=args.per_head_layers), steps=1 if args.quick else 3)
    res["seconds"] = time.perf_counter() - t0
    res["machine"] = {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"| job ({res['heads']} heads, {res['micro_batch_tokens']} tokens) | step s | tokens/s | / joint fused |")
    print("|---|---:|---:|---:|")
    for name, s in res["step_s"].items():
        print(f"| {name} | {s:.2f} | {res['micro_batch_tokens'] / s:.0f} | {s / res['step_s']['joint fused']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lens_training_per_head.json").write_text(json.dumps(res, indent=1))


# -- the DeepSpeed loop -------------------------------------------------------------------------------
def loop_split(task: Task, micro_batch: int, steps: int, log_every: int, grad_accum: int, root: Path) -> dict:
    """Return what `deepspeed_loop.train` did over `steps` optimizer steps on one synthetic cache shard: tokens/s
    and its host seconds per step by part (the final checkpoint included)."""
    from loralens.lens.training.batches import ShardData
    from loralens.lens.training.deepspeed_loop import TrainSpec, train

    rows = micro_batch * grad_accum * steps
    g = np.random.default_rng(0)
    data = ShardData(z=g.standard_normal((rows, 1, task.dims.z_width)).astype(np.float16).view(np.uint16),
                     scale=np.ones(rows, np.float32),
                     h_final=g.standard_normal((rows, task.dims.d_model)).astype(np.float32),
                     topk_ids=None, topk_logprobs=None, prompt_idx=np.arange(1, rows + 1, dtype=np.int32))
    spec = TrainSpec(shards=[0], train_rows={0: rows}, store_dtype="float16", micro_batch=micro_batch, epochs=1,
                     max_steps=None, lr=LR["lora"], weight_decay=0.0, zero_stage=2, seed=0, every=10**9,
                     checkpoint_every=10**6, log_every=log_every, grad_accum=grad_accum, checkpoint_minutes=None)
    model = lens_set(task, "lora", loss="exact", base_dtype="bfloat16")
    result, engine = train(model, lambda _s: data, spec, root / f"log{log_every}-accum{grad_accum}",
                           device=torch.device("cpu"))
    del engine
    return {"log_every": log_every, "grad_accum": grad_accum, "micro_batch_tokens": micro_batch,
            "steps": result.steps, "seconds": result.seconds,
            "tokens_per_s": result.tokens_per_rank / result.seconds,
            "seconds_per_step": {k: v / result.steps for k, v in result.timing.items()}}


def loop_main(args: argparse.Namespace) -> None:
    """Run the `--loop` measurement: one process, gloo, the same synthetic layer under each setting."""
    import tempfile

    from loralens.lens.training.deepspeed_loop import init_distributed, setup_process_env

    setup_process_env(torch.device("cpu"))
    init_distributed(torch.device("cpu"))
    micro, steps = (64, 4) if args.quick else (128, 10)
    task = make_task(SMOL, n_layers=1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [loop_split(task, micro, steps, log_every, accum, Path(tmp))
                for log_every, accum in ((1, 1), (10, 1), (10, 2))]
    result = {"benchmark": "lens training loop split", "quick": args.quick, "model_dims": "SmolLM2-135M, one layer",
              "runs": runs, "seconds": time.perf_counter() - t0,
              "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "processor": platform.processor() or platform.machine()}}
    print(f"{'log_every':>9} {'accum':>5} {'tok/s':>8}  s/step: {'read':>7} {'compute':>8} {'sync':>7} {'ckpt':>7}")
    for r in runs:
        sp = r["seconds_per_step"]
        print(f"{r['log_every']:>9} {r['grad_accum']:>5} {r['tokens_per_s']:>8.1f}          {sp['read']:>7.4f} "
              f"{sp['compute']:>8.4f} {sp['sync']:>7.4f} {sp['checkpoint']:>7.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lens_training_loop.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'lens_training_loop.json'} ({result['seconds']:.0f} s)")


# -- report ------------------------------------------------------------------------------------------
# The training worker runs with these (see loralens/tasks/stages/train.py); glibc reads them only at start-up.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def main() -> None:
    if any(k not in os.environ for k in MALLOC_ENV):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run, not a measurement")
    parser.add_argument("--out", default="benchmarks/results", help="folder for lens_training.json")
    parser.add_argument("--loop", action="store_true", help="only the DeepSpeed loop's per-step split")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every measurement, peaks included (default: torch's own)")
    parser.add_argument("--per-head", action="store_true",
                        help="only the per_head objective's cost, fused vs checkpointed (lens_training_per_head.json)")
    parser.add_argument("--per-head-layers", type=int, default=3, help="layers of the --per-head job")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.per_head:
        per_head_main(args)
        return
    if args.loop:
        loop_main(args)
        return
    # Full run ~5.5 min on 2 cores: a full-form step of 9 heads is ~10 s, an all-heads lora step ~35 s.
    p3_steps, p3_tokens = (4, 256) if args.quick else (8, 256)
    all_tokens, all_steps = (64, 1) if args.quick else (256, 2)  # 256: the trainer's default micro-batch

    t0 = time.perf_counter()
    peak = matmul_peak_flops()
    peak_bf16 = matmul_peak_flops(dtype=torch.bfloat16)
    task = make_task(SMOL, n_layers=1)
    held = make_batch(task, 256, seed=-1)
    p3 = {form: p3_run(task, form, p3_steps, p3_tokens, held) for form in ("lora", "full")}
    lora, full = p3["lora"], p3["full"]
    analytic = step_matmul_flops(SMOL, LensConfig(form="lora", rank=4, alpha=8.0), p3_tokens, CHUNK, 1)
    counted = p4_counted_flops(task, p3_tokens)
    achieved = analytic / lora["step_s"]
    all_task = make_task(SMOL, n_layers=SMOL.n_layers)
    default = p4_default(all_task, steps=1 if args.quick else 3)
    fl = default["matmul_flops"]
    for path in ("fused", "checkpointed"):
        step = default[f"{path}_step_s"]
        default[f"{path}_fraction_of_fp32_peak"] = (fl["bf16"] + fl["fp32"]) / step / peak
        default[f"{path}_fraction_of_roofline"] = (fl["bf16"] / peak_bf16 + fl["fp32"] / peak) / step
    # The trainer's default (exact, bf16 base) and its variants.
    tput = {f"{loss}/{bd}": throughput(all_task, loss, all_tokens, all_steps, bd)
            for loss, bd in (("exact", "bfloat16"), ("exact", "float32"), ("subset", "bfloat16"))}

    ratios = {"p3_memory": lora["peak_bytes"] / full["peak_bytes"], "p3_time": lora["step_s"] / full["step_s"],
              "p3_kl": lora["kl_end"] / full["kl_end"], "p4_peak_fraction": achieved / peak,
              "p4_default_fraction": default["fused_fraction_of_fp32_peak"]}
    result = {
        "benchmark": "P2-P4 lens training", "quick": args.quick, "goals": GOALS,
        "p2": p2_rows(),
        "p3": {"model_dims": "SmolLM2-135M, one layer, 9 heads", "micro_batch_tokens": p3_tokens, "loss": "subset",
               "lora": lora, "full": full, "ratios": {k: ratios[k] for k in ("p3_memory", "p3_time", "p3_kl")}},
        "p4": {"matmul_peak_flops_per_s": peak, "lora_step_matmul_flops": analytic,
               "lora_step_matmul_flops_counted": counted, "achieved_flops_per_s": achieved,
               "fraction_of_peak": ratios["p4_peak_fraction"],
               "full_fraction_of_peak": step_matmul_flops(SMOL, LensConfig(form="full"), p3_tokens, CHUNK, 1)
               / full["step_s"] / peak, "matmul_peak_bf16_flops_per_s": peak_bf16, "default_job": default},
        "throughput_all_heads": tput,
        "seconds": time.perf_counter() - t0,
        "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "processor": platform.processor() or platform.machine()},
    }
    print_report(result, ratios)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lens_training.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'lens_training.json'} ({result['seconds']:.0f} s)")


def print_report(result: dict, ratios: dict[str, float]) -> None:
    """Print the benchmark's table: metric, value, goal, verdict."""
    mb = 2**20
    lora, full = result["p3"]["lora"], result["p3"]["full"]
    rows = [(f"P2 {r['model']} {r['form']} r{r['rank']} params/head", f"{r['per_head']:,} ({r['ratio']:.4f}x)",
             f"<= {GOALS['p2_ratio']}x full", r["ok"]) for r in result["p2"]]
    rows += [
        ("P3 peak memory lora / full", f"{lora['peak_bytes'] / mb:.0f} / {full['peak_bytes'] / mb:.0f} MiB",
         "", None),
        ("P3 planned peak lora / full",
         f"{lora['planned_peak_bytes'] / mb:.0f} / {full['planned_peak_bytes'] / mb:.0f} MiB", "", None),
        ("P3 memory ratio", f"{ratios['p3_memory']:.3f}", f"<= {GOALS['p3_memory']}",
         ratios["p3_memory"] <= GOALS["p3_memory"]),
        ("P3 step time lora / full", f"{lora['step_s']:.2f} / {full['step_s']:.2f} s", "", None),
        ("P3 time ratio", f"{ratios['p3_time']:.3f}", f"<= {GOALS['p3_time']}", ratios["p3_time"] <= GOALS["p3_time"]),
        (f"P3 held-out KL after {lora['tokens_seen']} tokens", f"{lora['kl_end']:.4f} / {full['kl_end']:.4f} "
         f"(start {lora['kl_start']:.4f})", "", None),
        ("P3 KL ratio lora / full", f"{ratios['p3_kl']:.3f}", f"<= {GOALS['p3_kl']}",
         ratios["p3_kl"] <= GOALS["p3_kl"]),
        ("P4 matmul peak (fp32 mm 2048)", f"{result['p4']['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s", "", None),
        ("P4 lora step matmul FLOPs", f"{result['p4']['lora_step_matmul_flops'] / 1e9:.2f} G "
         f"(counted {result['p4']['lora_step_matmul_flops_counted'] / 1e9:.2f} G)", "", None),
        ("P4 lora achieved / peak", f"{ratios['p4_peak_fraction']:.3f}", f">= {GOALS['p4_peak_fraction']}",
         ratios["p4_peak_fraction"] >= GOALS["p4_peak_fraction"]),
        ("P4 full achieved / peak", f"{result['p4']['full_fraction_of_peak']:.3f}", "", None),
        ("P4 matmul peak (bf16 mm 2048)", f"{result['p4']['matmul_peak_bf16_flops_per_s'] / 1e9:.1f} GFLOP/s", "",
         None),
    ]
    d = result["p4"]["default_job"]
    for path in ("fused", "checkpointed"):
        frac = d[f"{path}_fraction_of_fp32_peak"]
        rows += [(f"P4 default job ({d['heads']} heads), {path}: step",
                  f"{d[f'{path}_step_s']:.2f} s ({d['micro_batch_tokens'] / d[f'{path}_step_s']:.0f} tok/s)", "", None),
                 (f"P4 default job, {path}: achieved / fp32 peak", f"{frac:.3f}",
                  f">= {GOALS['p4_peak_fraction']}", frac >= GOALS["p4_peak_fraction"]),
                 (f"P4 default job, {path}: achieved / roofline", f"{d[f'{path}_fraction_of_roofline']:.3f}", "",
                  None)]
    for loss, t in result["throughput_all_heads"].items():
        rows.append((f"{t['heads']} heads, {loss} base, {t['micro_batch_tokens']} tok/batch",
                     f"{t['tokens_per_s']:.1f} tok/s", "", None))
    width = max(len(r[0]) for r in rows) + 2
    vwidth = max(len(r[1]) for r in rows) + 2
    print(f"{'metric':<{width}}{'value':<{vwidth}}{'goal':<16}ok")
    print("-" * (width + vwidth + 20))
    for name, value, goal, ok in rows:
        print(f"{name:<{width}}{value:<{vwidth}}{goal:<16}{'' if ok is None else ('yes' if ok else 'NO')}")


if __name__ == "__main__":
    main()
