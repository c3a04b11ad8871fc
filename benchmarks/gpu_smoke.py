"""GPU smoke run: every stage of the pipeline with the model on cuda (dtype auto = bf16), then the 2-layer
Llama-3-8B-shaped model of `scale_llama3_8b.py` with one rank per GPU (two when two GPUs exist).

Per stage: wall time, peak GPU memory (`torch.cuda.max_memory_allocated` of the stage process; the training
workers report their own in the train summary), and tokens/s where the stage has a token count. Prints a table,
writes JSON. No network: the embedded SmolLM2 ships in a package; the 8B-shaped model is built locally.

    bash benchmarks/gpu_smoke.sh            (or: python benchmarks/gpu_smoke.py [--work DIR] [--skip-8b])
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from loralens.warehouse.constants import STAGES

GIB = 2**30


def run_pipeline(config: dict, label: str) -> list[dict]:
    """Run the stages one by one in this process; return one row per stage."""
    from loralens.flows.pipeline import pipeline

    rows = []
    for stage in STAGES:
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = pipeline(config=config, only=stage)[stage]
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
        if stage == "train" and res.get("cuda_peak_bytes"):
            peak = max(peak, res["cuda_peak_bytes"])
        tokens = {"cache": res.get("n_tokens"), "train": res.get("train_tokens")}.get(stage)
        rows.append({"run": label, "stage": stage, "wall_s": wall, "gpu_peak_bytes": peak,
                     "tokens_per_s": tokens / wall if tokens else None})
        tps = f"{rows[-1]['tokens_per_s']:.0f}" if tokens else "-"
        print(f"{label:<12} {stage:<10} {wall:8.1f} s  GPU peak {peak / GIB:6.2f} GB  tokens/s {tps}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/loralens-gpu-smoke")
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_smoke: no CUDA device here; run it on a GPU machine")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    t0 = time.perf_counter()
    rows = run_pipeline({"home": str(work / "home-default"), "model": {"device": "cuda"}}, "default")

    if not args.skip_8b:
        sys.path.insert(0, str(Path(__file__).parent))
        from scale_llama3_8b import build_model, pipeline_config

        model = build_model(work / "llama3-8b-2layer")
        config = pipeline_config(work / "home-8b", model, 1)
        config["model"] |= {"device": "cuda", "dtype": "auto"}
        world = min(gpus, 2)
        config["train"] |= {"world_size": world}
        # Each rank trains on whole cache shards: 64 prompts in `world` shards, one per rank at least.
        config["cache"] = config.get("cache", {}) | {"prompts_per_shard": 64 // world}
        rows += run_pipeline(config, f"8b-2layer x{min(gpus, 2)}")

    total = time.perf_counter() - t0
    print(f"\n{'run':<16} {'stage':<10} {'wall s':>8} {'GPU GB':>8} {'tokens/s':>9}")
    for r in rows:
        tps = f"{r['tokens_per_s']:9.0f}" if r["tokens_per_s"] else f"{'-':>9}"
        print(f"{r['run']:<16} {r['stage']:<10} {r['wall_s']:8.1f} {r['gpu_peak_bytes'] / GIB:8.2f} {tps}")
    print(f"total {total:.0f} s on {gpus} x {torch.cuda.get_device_name(0)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "GPU smoke", "rows": rows, "total_s": total, "gpus": gpus,
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version()}
    (out / "gpu_smoke.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'gpu_smoke.json'}")


if __name__ == "__main__":
    main()
