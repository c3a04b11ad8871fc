"""Does a per-head lens trained on the MODEL'S OWN distribution read copying, given full capacity and copying in its
training data? (issue 21, goal (a); the counterpart of `lens_copy_ceiling.py`)

`lens_copy_ceiling.py` showed that one head's output names the copied token at goal (a)'s level through a read-out
`e^s W_fold (I + D) x_h + b` (`D` a full `d x d` matrix, `b` a vocabulary bias) trained with cross-entropy on the
copied token. A lens is not trained on that label: the Attention Lens objective (`per_head`) matches the model's
next-token distribution. This benchmark trains the same read-out with that objective (KL(model || lens), i.e.
cross-entropy against the model's soft distribution) at EVERY position of repeated random-token sequences (the first
copy, where the model can only guess, and the second, where it copies), each step on 8 fresh sequences (seeds from
1001 on: no sequence is seen twice), and reads the copy top-1 on the held-out sequences of `lens_copy_ceiling.py`
(seeds 0..., 1,536 positions; validation seeds 501... choose the step). So it is the most favourable case for a lens
(the largest linear read-out of one head, the mechanism in every training sequence, unlimited data), and its answer
bounds what any KL-trained lens of a head can read.

    python benchmarks/lens_copy_kl.py --heads L23H2 --threads 1     # (and L29H1 in a second process)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lens_copy_ceiling import OUT, PER_SEED, SEEDS, SEQ_LEN, Readout, collect, fmt, rates
from tqdm.auto import tqdm

from loralens.api.heads import check_heads
from loralens.lens.evaluation.mechanisms import model_repeated_tokens
from loralens.lens.heads.hooks import capture
from loralens.lens.lenses.lens_set import lens_inputs
from loralens.lens.runtime.adapters import folded_unembedding, norm_scale, out_proj_weight


@torch.no_grad()
def batch(loaded, layer: int, head: int, w_o: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(x [n, d], model log-probs [n, V])` at every position after BOS of `PER_SEED` sequences of `seed`."""
    tokens, offset = model_repeated_tokens(loaded, batch=PER_SEED, seq_len=SEQ_LEN, seed=seed)
    with capture(loaded.model, loaded.adapter, [layer]) as cap:
        logits = loaded.model(input_ids=tokens, use_cache=False).logits
    scale = norm_scale(loaded.adapter, loaded.model, cap.final_resid).squeeze(-1)  # [B, T]
    x = lens_inputs(cap.z[layer][:, offset:].reshape(-1, cap.z[layer].shape[-1]),
                    scale[:, offset:].reshape(-1), w_o)[:, head]  # [n, d]
    return x.float(), F.log_softmax(logits[:, offset:].float(), -1).reshape(len(x), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", nargs="+", default=["L23H2"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--val-seqs", type=int, default=32)
    ap.add_argument("--held-out-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=None, help="folder of lens_copy_ceiling's collected positions")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from loralens.api import load_model

    loaded = load_model("smollm2-135m-instruct")
    heads = check_heads(" ".join(args.heads), list(range(loaded.dims.n_layers)), loaded.dims.n_heads)
    w = folded_unembedding(loaded.adapter, loaded.model)[0].float()
    w_bf16 = w.to(torch.bfloat16)
    val = collect(loaded, heads, SEEDS["val"], args.val_seqs, "val sequences", args.cache)
    test = collect(loaded, heads, SEEDS["test"], args.held_out_seqs, "held-out sequences", args.cache)
    rows = []
    for layer, head in heads:
        name = f"L{layer}H{head}"
        w_o = out_proj_weight(loaded.adapter, loaded.model, layer, loaded.dims).float()
        xv, tv = val.head((layer, head))
        torch.manual_seed(0)
        lens = Readout(w.shape[1], w.shape[0], None, True)
        opt = torch.optim.AdamW(lens.parameters(), lr=args.lr, weight_decay=0.0)
        best, best_state, history, t0 = -1.0, None, [], time.perf_counter()
        bar = tqdm(range(args.steps + 1), desc=name)
        for step in bar:
            loss = torch.tensor(float("nan"))
            if step > 0:
                x, target = batch(loaded, layer, head, w_o, SEEDS["train"] + step)
                loss = -(target.exp() * F.log_softmax(lens(x, w_bf16), -1)).sum(-1).mean()  # KL up to a constant
                opt.zero_grad()
                loss.backward()
                opt.step()
            if step % args.eval_every == 0:
                v = rates(lambda c, m=lens: m(c, w), xv, tv, val.seqs)["top1"]["rate"]
                history.append({"step": step, "loss": loss.item(), "val_top1": v})
                bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{v:.3f}")
                if v > best:
                    best, best_state = v, copy.deepcopy(lens.state_dict())
        lens.load_state_dict(best_state)
        xt, tt = test.head((layer, head))
        row = {"head": name, "seconds": time.perf_counter() - t0, "val_top1": best,
               "best_step": max(history, key=lambda h: h["val_top1"])["step"],
               "logit_lens_held_out": rates(lambda c: c @ w.T, xt, tt, test.seqs),
               "kl_lens_held_out": rates(lambda c, m=lens: m(c, w), xt, tt, test.seqs), "history": history}
        rows.append(row)
        print(f"| {name} | {fmt(row['logit_lens_held_out']['top1'])} | {fmt(row['kl_lens_held_out']['top1'])} | "
              f"{fmt(row['kl_lens_held_out']['top5'])} | {row['best_step']} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    file = args.out / "lens_copy_kl.json"
    old = json.loads(file.read_text()).get("heads", []) if file.exists() else []
    mine = {r["head"] for r in rows}
    file.write_text(json.dumps({
        "benchmark": "a per-head full-rank read-out trained on the model's distribution (KL) over repeated random "
                     "tokens: copy top-1 (issue 21, goal (a))",
        "model": "smollm2-135m-instruct (embedded)", "model_own_top1_held_out": test.model_top1,
        "config": {k: str(v) for k, v in vars(args).items() if k not in ("out", "cache", "heads")},
        "train_positions_per_step": PER_SEED * 2 * SEQ_LEN,
        "heads": [r for r in old if r["head"] not in mine] + rows}, indent=1))


if __name__ == "__main__":
    main()
