"""How well can a per-head read-out `W_fold T x_h` name the copied token when trained on copying itself? (issue 21)

An oracle bound for a head's lens on the copying check of `lens_mechanisms.py`: a translator `T = I + U V` (rank
`--rank`, identity at start = the logit lens; the tuned-lens form, per head) trained with cross-entropy ON the copied
token, on `--train-seqs` sequences of BOS + 25 random tokens repeated twice (seeds 1001...), then read on the
benchmark's held-out batch (seed 0, 8 sequences, 192 positions). A lens trained on the model's own output never sees
this target, so this bounds what a per-head linear read-out through the unembedding can reach, it is not a lens.

    python benchmarks/lens_copy_ceiling.py --heads L29H1 L23H2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loralens.api.heads import check_heads
from loralens.lens.evaluation.mechanisms import copy_positions, hit_rates, model_repeated_tokens, run_repeated
from loralens.lens.runtime.adapters import folded_unembedding, out_proj_weight

OUT = Path(__file__).resolve().parent / "results"
SEQ_LEN = 25


def head_inputs(loaded, layers: list[int], seed: int, batch: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Return layer -> per-head lens inputs `[n, H, d]` at the copy positions, and the copied tokens `[n]`."""
    tokens, offset = model_repeated_tokens(loaded, batch=batch, seq_len=SEQ_LEN, seed=seed)
    pos = copy_positions(run_repeated(loaded.model, loaded.adapter, tokens), tokens, SEQ_LEN, offset)
    x = {layer: pos.inputs(layer, out_proj_weight(loaded.adapter, loaded.model, layer, loaded.dims).float())
         for layer in layers}
    return x, pos.targets


def rates(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Return top-1 / top-5 rates of `[n, V]` logits."""
    top1, top5 = hit_rates(logits[:, None], targets, 5)
    return {"top1": float(top1[0]) / len(targets), "top5": float(top5[0]) / len(targets)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", nargs="+", default=["L29H1", "L23H2"])
    ap.add_argument("--train-seqs", type=int, default=320)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from loralens.api import load_model

    loaded = load_model("smollm2-135m-instruct")
    heads = check_heads(" ".join(args.heads), list(range(loaded.dims.n_layers)), loaded.dims.n_heads)
    layers = sorted({layer for layer, _ in heads})
    w_fold = folded_unembedding(loaded.adapter, loaded.model)[0].float()  # [V, d]
    w_bf16 = w_fold.to(torch.bfloat16)  # the training GEMM in bf16 (evaluation in fp32)
    parts = [head_inputs(loaded, layers, seed=1000 + s, batch=8)
             for s in tqdm(range(1, 1 + args.train_seqs // 8), desc="train sequences")]  # seed 0: held out
    train_x = {layer: torch.cat([p[0][layer] for p in parts]) for layer in layers}
    train_t = torch.cat([p[1] for p in parts])
    test_x, test_t = head_inputs(loaded, layers, seed=0, batch=8)
    rows = []
    for layer, head in heads:
        xs = train_x[layer][:, head]  # [n, d]
        d = xs.shape[1]
        u = torch.nn.Parameter(torch.zeros(d, args.rank))
        v = torch.nn.Parameter(torch.randn(args.rank, d) / d ** 0.5)
        temp = torch.nn.Parameter(torch.zeros(()))  # log inverse temperature (top-k does not depend on it)
        opt = torch.optim.Adam([u, v, temp], lr=args.lr)

        def read(x: torch.Tensor, gemm: torch.Tensor = w_fold, u=u, v=v, temp=temp) -> torch.Tensor:
            moved = x + (x @ v.T) @ u.T  # T x = x + U V x
            return (moved.to(gemm.dtype) @ gemm.T).float() * temp.exp()

        t0 = time.perf_counter()
        for _ in tqdm(range(args.steps), desc=f"L{layer}H{head}", leave=False):
            loss = F.cross_entropy(read(xs, w_bf16), train_t)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = {"logit": rates(test_x[layer][:, head] @ w_fold.T, test_t),
                   "oracle": rates(read(test_x[layer][:, head]), test_t),
                   "oracle_on_its_training_positions": rates(read(xs), train_t)}
        rows.append({"head": f"L{layer}H{head}", "seconds": time.perf_counter() - t0, "final_loss": float(loss),
                     **{f"{k}_{m}": r[m] for k, r in out.items() for m in ("top1", "top5")}})
        print(rows[-1], flush=True)
    print("| head | logit lens top-1 / top-5 | oracle translator, held-out top-1 / top-5 | on its training positions |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['head']} | {r['logit_top1']:.3f} / {r['logit_top5']:.3f} | {r['oracle_top1']:.3f} / "
              f"{r['oracle_top5']:.3f} | {r['oracle_on_its_training_positions_top1']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lens_copy_ceiling.json").write_text(json.dumps(
        {"benchmark": "oracle ceiling of a per-head linear read-out on copying (issue 21)", "rank": args.rank,
         "train_positions": len(train_t), "held_out_positions": len(test_t), "steps": args.steps, "lr": args.lr,
         "heads": rows}, indent=1))


if __name__ == "__main__":
    main()
