"""Llama-3-8B scale on this CPU: every stage of the real pipeline on a 2-layer model with Llama-3-8B's dimensions.

Builds (once) a model with Llama-3-8B's published dimensions truncated to 2 layers: 32 query heads, 8 KV heads,
d_model 4096, d_ff 14336, vocab 128256, rope theta 500000, untied embeddings; 1.49 B parameters, random
weights, saved as a sharded bf16 safetensors folder with SmolLM2's tokenizer (49,152 tokens: the embedding has
more rows than the tokenizer has tokens, as in many real models). Then runs `loralens run --only STAGE` for each
stage in turn (real CLI, real Prefect, a fresh process per stage) with `model.dtype: bfloat16`, 64 prompts,
`cache.max_length: 32`, `train.epochs: 1` and a reduced intervene config, and records per stage: wall time, the
peak resident memory of every process the stage starts (polled every 0.1 s; the training worker included;
Prefect's own server is reported apart) and the prediction of `loralens plan`. Then cache/train/decode/attribute
again at other prompt multiples (memory growth, time per token). P9: decode + attribute seconds over the matmul
lower bound (2 lenses x 2 H d V FLOPs per head-layer position, at this machine's fp32 GEMM rate measured right
after each of the two stages, the faster of the two: on a shared machine the bound is then the lower one), from
the stages' own seconds (their summaries) and from the wall time of the CLI processes (start-up included).
Finally the plan for the full 32-layer Llama-3-8B with the same settings.

    python benchmarks/scale_llama3_8b.py [--work /tmp/loralens-8b] [--scales 1 2 4] [--out benchmarks/results]
        [--out-name scale_llama3_8b.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml

from loralens.config import DecodeConfig, default_home, load_config
from loralens.lens.runtime.models import resolve_model_path
from loralens.tasks.memory import STAGES as PLANNED_STAGES
from loralens.tasks.memory import predict
from loralens.warehouse.constants import STAGES as PIPELINE

LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, num_hidden_layers=32)
SCALED = ("cache", "train", "decode", "attribute")
GIB = 2**30


def build_model(folder: Path) -> Path:
    """Save the 2-layer Llama-3-8B-shaped model (random bf16 weights, SmolLM2 tokenizer) once."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = resolve_model_path("smollm2-135m-instruct", default_home())
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(**(LLAMA3_8B | {"num_hidden_layers": 2}), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="1GB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def pipeline_config(home: Path, model: Path, scale: float) -> dict:
    """Return the reduced but complete config of one scale (64 x scale prompts, half toxic, half not)."""
    return {
        "home": str(home),
        "model": {"name": str(model), "dtype": "bfloat16"},
        "corpus": {"max_prompts_per_file": int(32 * scale)},
        "cache": {"max_length": 32, "batch_size": 8},
        "train": {"epochs": 1},
        "select": {"max_prompts": 4, "batch_prompts": 4, "exact_heads": 8, "candidates": 2, "tries": 1, "k": 1},
        "intervene": {"max_prompts": 4, "k": 2, "max_new_tokens": 8, "head_sets": [{"top_n": 3}],
                      "ppl_tokens": 128, "ppl_window": 64, "mean_tokens": 128, "ablation_candidates": 0,
                      "n_boot": 200, "batch_prompts": 4},
    }


def run_stage(config_file: Path, stage: str) -> dict:
    """Run `loralens run --only stage`; return wall seconds and the peak RSS of each process it started."""
    cmd = [str(Path(sys.executable).parent / "loralens"), "run", "--config", str(config_file), "--only", stage]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, tuple[str, int]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    kind = _kind(p.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if rss > peaks.get(p.pid, ("", 0))[1]:
                    peaks[p.pid] = (kind, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    out = proc.stdout.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed (exit {proc.returncode}):\n{out[-3000:]}")
    by_kind: dict[str, int] = {}
    for kind, rss in peaks.values():
        by_kind[kind] = max(by_kind.get(kind, 0), rss)
    return {"wall_s": wall, "peak_rss": by_kind}


def _kind(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "train_worker" in text:
        return "train worker"
    if "prefect" in text and "server" in text or "uvicorn" in text:
        return "prefect server"
    return "stage process"


def gemm_flops_per_s(m: int, d: int, v: int, repeats: int = 3) -> float:
    """Return the best fp32 GEMM rate of `[m, d] @ [d, v]` on this machine."""
    a, b = torch.randn(m, d), torch.randn(d, v)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * d * v / best


def planned(cfg_raw: dict, stage: str) -> int:
    """Return the plan's predicted peak for a stage (train: the larger of training and evaluation)."""
    from loralens.config import parse_config

    cfg = parse_config(cfg_raw)
    if stage == "train":
        return max(predict(cfg, "train").total, predict(cfg, "eval").total)
    return predict(cfg, stage).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/loralens-8b")
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 0.5, 2],
                        help="prompt multiples of 64; the first runs every stage, the others cache..attribute")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--out-name", default="scale_llama3_8b.json", help="the JSON file's name in --out")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = build_model(work / "llama3-8b-2layer")
    print(f"model folder {model} ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows, rates = [], []
    for scale in args.scales:
        raw = pipeline_config(work / f"home-{scale}x", model, scale)
        cfg_file = work / f"config-{scale}x.yaml"
        cfg_file.write_text(yaml.safe_dump(raw))
        for stage in PIPELINE if scale == args.scales[0] else SCALED:
            res = run_stage(cfg_file, stage)
            stage_peak = max(v for k, v in res["peak_rss"].items() if k != "prefect server")
            row = {"scale": scale, "prompts": int(64 * scale), "stage": stage, "wall_s": res["wall_s"],
                   "peak_rss": res["peak_rss"], "peak": stage_peak, "planned": planned(raw, stage)}
            row["measured_over_planned"] = row["peak"] / row["planned"]
            rows.append(row)
            if scale == args.scales[0] and stage in ("decode", "attribute"):
                rates.append(gemm_flops_per_s(DecodeConfig().chunk_tokens * LLAMA3_8B["num_attention_heads"],
                                              LLAMA3_8B["hidden_size"], LLAMA3_8B["vocab_size"]))
            print(f"{scale}x {stage:<10} {row['wall_s']:7.1f} s  peak {row['peak'] / GIB:5.2f} GB  "
                  f"planned {row['planned'] / GIB:5.2f} GB  ({row['measured_over_planned']:.2f}x)  "
                  + ", ".join(f"{k} {v / GIB:.2f} GB" for k, v in res["peak_rss"].items()), flush=True)

    # Growth from the smallest to the largest scale, and time per token.
    first, last = min(args.scales), max(args.scales)
    growth = {}
    for stage in SCALED:
        a = next(r for r in rows if r["scale"] == first and r["stage"] == stage)
        b = next(r for r in rows if r["scale"] == last and r["stage"] == stage)
        growth[stage] = {"peak_growth": b["peak"] / a["peak"] - 1,
                         "time_vs_linear": b["wall_s"] / (a["wall_s"] * last / first),
                         "time_per_prompt_s": {str(first): a["wall_s"] / a["prompts"],
                                               str(last): b["wall_s"] / b["prompts"]}}

    # P9: decode + attribute over the matmul lower bound (first scale: last position of each prompt, every layer).
    base = args.scales[0]
    cfg1 = load_config(work / f"config-{base}x.yaml")
    summaries = {s: json.loads(next((work / f"home-{base}x" / "artifacts" / s).glob("*/manifest.json")).read_text())
                 ["summary"] for s in ("decode", "attribute")}
    positions = summaries["decode"]["positions"] * summaries["decode"]["layers"]
    d, v, h = LLAMA3_8B["hidden_size"], LLAMA3_8B["vocab_size"], LLAMA3_8B["num_attention_heads"]
    rate = max(rates)
    bound_s = 2 * (2 * h * d * v * positions) / rate  # two lenses (trained, logit)
    wall = {s: next(r["wall_s"] for r in rows if r["scale"] == base and r["stage"] == s)
            for s in ("decode", "attribute")}
    own = {s: summaries[s]["seconds"] for s in ("decode", "attribute")}
    p9 = {"positions": positions, "chunk_tokens": cfg1.decode.chunk_tokens, "gemm_flops_per_s": rate,
          "gemm_flops_per_s_each": rates, "lower_bound_s": bound_s, "stage_seconds": own, "wall_seconds": wall,
          "ratio": sum(own.values()) / bound_s, "ratio_wall": sum(wall.values()) / bound_s, "goal": 1.3}

    # The plan of the full 32-layer Llama-3-8B with the same settings.
    full_cfg = work / "llama3-8b-config.json"
    full_cfg.write_text(json.dumps({"model_type": "llama", **LLAMA3_8B}))
    raw_full = pipeline_config(work / "home-plan", full_cfg, base)
    full_plan = {s: planned(raw_full, s) if s != "eval" else None for s in PLANNED_STAGES if s != "eval"}

    print()
    print(f"{'scale':>5} {'stage':<10} {'wall s':>8} {'peak GB':>8} {'plan GB':>8} {'meas/plan':>9}")
    for r in rows:
        print(f"{r['scale']:>4}x {r['stage']:<10} {r['wall_s']:8.1f} {r['peak'] / GIB:8.2f} {r['planned'] / GIB:8.2f} "
              f"{r['measured_over_planned']:9.2f}")
    print(f"\n{'stage':<10} {'peak growth':>12} {'time vs linear':>15}   ({first}x -> {last}x prompts)")
    for stage, g in growth.items():
        print(f"{stage:<10} {g['peak_growth']:12.1%} {g['time_vs_linear']:15.2f}")
    print(f"\nP9 decode+attribute / matmul bound: {p9['ratio']:.2f}x from the stages' own seconds "
          f"({own['decode']:.1f} + {own['attribute']:.1f} s), {p9['ratio_wall']:.2f}x from CLI wall time "
          f"({wall['decode']:.1f} + {wall['attribute']:.1f} s); bound {bound_s:.1f} s at {rate / 1e9:.0f} GFLOP/s; "
          f"goal <= 1.3")
    print("\nloralens plan, full 32-layer Llama-3-8B (same settings):")
    for stage, b in full_plan.items():
        print(f"  {stage:<10} {b / GIB:8.1f} GB")
    result = {"benchmark": "Llama-3-8B scale (2 layers, CPU)", "model": LLAMA3_8B | {"num_hidden_layers": 2},
              "rows": rows, "growth": growth, "p9": p9, "plan_full_llama3_8b_bytes": full_plan,
              "machine": {"cpus": psutil.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                          "python": platform.python_version(), "torch": torch.__version__}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / args.out_name).write_text(json.dumps(result, indent=1))
    print(f"wrote {out / args.out_name}")


if __name__ == "__main__":
    main()
