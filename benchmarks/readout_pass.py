"""P9 per chunk: decode's one readout pass over a `[chunk, heads, vocab]` block vs the matmul lower bound.

At Llama-3-8B's sizes (32 heads, d_model 4096, vocab 128256; a rank-4 Lora Lens bank over the folded
unembedding), side by side in one process, rounds alternating, best round of each side (damps other load):

    pass   `read_heads`: logit-lens projection (shared), the trained lens on top, top-k + full-softmax probs
           and expected token toxicity of both lenses, direct logit attribution
    bound  two bare GEMMs `[chunk*H, d] @ [d, V]` (one per lens), the issue's lower bound

ratio = pass / bound (goal <= 1.3). Below 1 is possible: the two lenses share one projection.

    python benchmarks/readout_pass.py [--chunk 32] [--rounds 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from loralens.lens.heads.head_scores import toxic_direction
from loralens.lens.lenses.lens_set import FoldedUnembed, LensBank, LensConfig
from loralens.lens.lenses.readout import read_heads

H, D, V = 32, 4096, 128256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", type=int, default=32, help="positions per block (decode.chunk_tokens)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    w = torch.randn(V, D) / D**0.5
    bank = LensBank(FoldedUnembed(w), H, LensConfig(form="lora", rank=4)).eval()
    with torch.no_grad():
        bank.lora_B.normal_(0, 0.01)
    tox = torch.rand(V)
    u = toxic_direction(w, tox)
    x = torch.randn(args.chunk, H, D)
    flat = x.reshape(-1, D)
    best = {"pass": float("inf"), "bound": float("inf")}
    with torch.no_grad():
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            read_heads(bank, x, 10, tox, u)
            best["pass"] = min(best["pass"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _lens in range(2):
                flat @ w.T
            best["bound"] = min(best["bound"], time.perf_counter() - t0)
    ratio = best["pass"] / best["bound"]
    flops = 2 * (2 * args.chunk * H * D * V)
    print(f"{'chunk':>5} {'pass s':>8} {'bound s':>8} {'ratio':>6} {'bound GFLOP/s':>14}")
    print(f"{args.chunk:>5} {best['pass']:8.3f} {best['bound']:8.3f} {ratio:6.2f} {flops / best['bound'] / 1e9:14.0f}")
    print(f"P9 per chunk: {ratio:.2f}x the two-GEMM lower bound (goal <= 1.3)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "readout_pass.json").write_text(json.dumps({
        "benchmark": "P9 per chunk (decode's one readout pass vs two bare GEMMs)", "heads": H, "d_model": D,
        "vocab": V, "chunk": args.chunk, "rounds": args.rounds, "pass_s": best["pass"], "bound_s": best["bound"],
        "ratio": ratio, "goal": 1.3, "bound_gflops": flops / best["bound"] / 1e9,
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
    }, indent=1))
    print(f"wrote {out / 'readout_pass.json'}")


if __name__ == "__main__":
    main()
