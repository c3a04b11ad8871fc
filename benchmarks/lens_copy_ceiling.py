"""Can ANY linear read-out of one head's output through the unembedding name the copied token? (issue 21, goal (a))

An oracle bound for a head's lens on the copying check of `lens_mechanisms.py`. The read-out is
`logits = e^s W_fold (I + D) x_h + b`: `x_h` the head's lens input (`[d]`, the logit lens reads `W_fold x_h`), `D` a
free `d x d` matrix (`--rank full`, the default) or `U V` of rank `--rank` (the tuned-lens translator, per head),
`b` an optional free bias over the vocabulary (`--bias`, on by default), `s` a free log inverse temperature. It is
trained with cross-entropy ON the copied token itself, which no lens trained on the model's output ever sees: so it
bounds what a per-head lens of this form can reach, it is not a lens.

Data: sequences of BOS + 25 random tokens repeated twice, 24 scored positions each (`mechanisms.copy_positions`);
three disjoint seed ranges, 8 sequences per seed:

    train       --train-seqs     seeds 1001...   minibatch AdamW over positions (`--batch` per step)
    validation  --val-seqs       seeds 501...    early stopping, and the choice of weight decay
    held-out    --held-out-seqs  seeds 0...      read ONCE, by the chosen fit only (seed 0 is lens_mechanisms' batch)

Weight decay (decoupled, AdamW) pulls `D` (or `U`, `V`) toward 0, so `T = I + D` toward the logit lens; the bias and
temperature are not decayed. For each head: one fit per `--weight-decays` value on all training sequences, the one
with the best validation top-1 is chosen; then the learning curve refits it (same decay) on `--curve` fractions of the
training sequences, read on the validation set, to show whether more data would still raise the rate. Rates carry
a 95% percentile bootstrap interval over sequences (`statistics.bootstrap_ci`: a sequence's positions are not
independent). The training-set rate is read on its first `--held-out-seqs` sequences.

    python benchmarks/lens_copy_ceiling.py                 # the measurement (writes results/lens_copy_ceiling.json)
    python benchmarks/lens_copy_ceiling.py --quick         # a ~1-minute smoke run (writes nothing without --out)

As measured (one process per head, 1 thread each, positions collected once into a cache; both write their rows into
the same results file), and the longer fits of the chosen setting (`lens_copy_ceiling_long.json`):

    python benchmarks/lens_copy_ceiling.py --heads L29H1 --threads 1 --cache /tmp/copy_cache
    python benchmarks/lens_copy_ceiling.py --heads L23H2 --threads 1 --cache /tmp/copy_cache
    python benchmarks/lens_copy_ceiling.py --heads L29H1 --threads 1 --cache /tmp/copy_cache --steps 1200 \
        --patience 8 --weight-decays 0 --curve 1 --results-name lens_copy_ceiling_long.json   # and L23H2
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from loralens.api.heads import check_heads
from loralens.lens.evaluation.mechanisms import copy_positions, model_repeated_tokens, run_repeated
from loralens.lens.evaluation.statistics import bootstrap_ci
from loralens.lens.runtime.adapters import folded_unembedding, out_proj_weight

OUT = Path(__file__).resolve().parent / "results"
SEQ_LEN = 25
PER_SEED = 8  # sequences per seed (lens_mechanisms' batch)
SEEDS = {"train": 1001, "val": 501, "test": 0}  # first seed of each split; ranges must not overlap
EVAL_CHUNK = 512


@dataclass(frozen=True)
class Split:
    """One split's copy positions for the chosen heads: `n` = seqs * (L - 1) positions, in sequence order."""

    x: dict[tuple[int, int], Tensor]  # (layer, head) -> [n, d] lens inputs
    targets: Tensor  # [n] the copied token
    seqs: int
    model_top1: float  # the model's own next-token top-1 rate at these positions

    def head(self, lh: tuple[int, int], seqs: int | None = None) -> tuple[Tensor, Tensor]:
        """Return `(x [m, d], targets [m])` of the first `seqs` sequences (all by default)."""
        m = len(self.targets) if seqs is None else seqs * (len(self.targets) // self.seqs)
        return self.x[lh][:m], self.targets[:m]


def collect(loaded, heads: list[tuple[int, int]], first_seed: int, seqs: int, desc: str,
            cache: Path | None = None) -> Split:
    """Return the copy positions of `seqs` sequences (`PER_SEED` per seed from `first_seed`) for `heads`.

    With a `cache` folder, a split already collected with the same heads, seeds and size is read from it (the forward
    passes are most of a small run's time on a loaded CPU), and a new one is written there.
    """
    if seqs % PER_SEED:
        raise ValueError(f"{desc}: sequences must be a multiple of {PER_SEED}, got {seqs}")
    file = None if cache is None else cache / f"copy_{first_seed}_{seqs}.pt"
    if file is not None and file.exists():
        kept = torch.load(file)
        if all(lh in kept["x"] for lh in heads):
            return Split(**{**kept, "x": {lh: kept["x"][lh] for lh in heads}})
    layers = sorted({layer for layer, _ in heads})
    w_o = {layer: out_proj_weight(loaded.adapter, loaded.model, layer, loaded.dims).float() for layer in layers}
    xs: dict[tuple[int, int], list[Tensor]] = {lh: [] for lh in heads}
    targets, own = [], []
    for seed in tqdm(range(first_seed, first_seed + seqs // PER_SEED), desc=desc):
        tokens, offset = model_repeated_tokens(loaded, batch=PER_SEED, seq_len=SEQ_LEN, seed=seed)
        pos = copy_positions(run_repeated(loaded.model, loaded.adapter, tokens), tokens, SEQ_LEN, offset)
        for layer in layers:
            x = pos.inputs(layer, w_o[layer])  # [n, H, d]
            for lh in heads:
                if lh[0] == layer:
                    xs[lh].append(x[:, lh[1]].contiguous())
        targets.append(pos.targets)
        own.append(pos.model_top1)
    split = Split(x={lh: torch.cat(v) for lh, v in xs.items()}, targets=torch.cat(targets), seqs=seqs,
                  model_top1=float(np.mean(own)))
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(vars(split), file)
    return split


class Readout(nn.Module):
    """`e^s W_fold (I + D) x + b`: D full (`rank=None`) or `U V` of rank `rank`; identity at start (the logit lens)."""

    def __init__(self, d: int, vocab: int, rank: int | None, bias: bool):
        super().__init__()
        if rank is None:
            self.D = nn.Parameter(torch.zeros(d, d))
        else:
            self.U = nn.Parameter(torch.zeros(d, rank))
            self.V = nn.Parameter(torch.randn(rank, d) / d ** 0.5)
        self.rank = rank
        self.b = nn.Parameter(torch.zeros(vocab)) if bias else None
        self.s = nn.Parameter(torch.zeros(()))

    def decayed(self) -> list[nn.Parameter]:
        """Return the translator's parameters (the ones weight decay pulls toward the logit lens)."""
        return [self.D] if self.rank is None else [self.U, self.V]

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        """Return logits `[n, V]` of `x [n, d]` through `w [V, d]` (the GEMM in `w`'s dtype, the result fp32)."""
        moved = (x + (x @ self.D.T if self.rank is None else (x @ self.V.T) @ self.U.T)) * self.s.exp()
        logits = (moved.to(w.dtype) @ w.T).float()
        return logits if self.b is None else logits + self.b


@torch.no_grad()
def hits(read, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Return per-position top-1 and top-5 hits `[n]` (bool) of `read(x_chunk) -> [c, V]` logits."""
    top1, top5 = [], []
    for i in range(0, len(targets), EVAL_CHUNK):
        logits = read(x[i:i + EVAL_CHUNK])
        ids = logits.topk(5, dim=-1).indices == targets[i:i + EVAL_CHUNK, None]
        top1.append(ids[:, 0])
        top5.append(ids.any(-1))
    return torch.cat(top1), torch.cat(top5)


def rate(hit: Tensor, seqs: int) -> dict:
    """Return the rate of per-position hits `[seqs * (L - 1)]` with a 95% bootstrap interval over sequences."""
    per_seq = hit.float().reshape(seqs, -1).numpy()
    low, high = bootstrap_ci(per_seq, lambda s: s.mean(axis=(-2, -1)), n_boot=2000, batched=True)
    return {"rate": float(per_seq.mean()), "low": low, "high": high}


def rates(read, x: Tensor, targets: Tensor, seqs: int) -> dict:
    """Return top-1 and top-5 `rate`s of a read-out on `x [n, d]`."""
    top1, top5 = hits(read, x, targets)
    return {"top1": rate(top1, seqs), "top5": rate(top5, seqs)}


def fit(x: Tensor, t: Tensor, xv: Tensor, tv: Tensor, w_bf16: Tensor, wd: float, args, desc: str) -> dict:
    """Train a `Readout` on `(x [n, d], t [n])` with minibatch AdamW; keep the state with the best validation top-1.

    Validation (bf16, like training) every `args.eval_every` steps; stop after `args.patience` evaluations without
    a gain, or at `args.steps`. Returns the best read-out and its history.
    """
    torch.manual_seed(0)
    model = Readout(x.shape[1], w_bf16.shape[0], args.rank, args.bias)
    rest = [p for n, p in model.named_parameters() if n not in ("D", "U", "V")]
    opt = torch.optim.AdamW([{"params": model.decayed(), "weight_decay": wd},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(t), generator=g)
    cursor, best, best_state, since, history, loss = 0, -1.0, None, 0, [], torch.tensor(float("nan"))
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps + 1), desc=desc, leave=False)
    for step in bar:  # step 0 only evaluates the start, the logit lens (so the best fit is never worse)
        if step > 0:
            if cursor + args.batch > len(t):  # a new epoch
                order, cursor = torch.randperm(len(t), generator=g), 0
            idx = order[cursor:cursor + args.batch]
            cursor += args.batch
            loss = F.cross_entropy(model(x[idx], w_bf16), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            val = float(hits(lambda c: model(c, w_bf16), xv, tv)[0].float().mean())
            history.append({"step": step, "epoch": step * args.batch / len(t), "loss": loss.item(), "val_top1": val})
            bar.set_postfix(loss=f"{loss.item():.2f}", val=f"{val:.3f}")
            if val > best:
                best, best_state, since = val, copy.deepcopy(model.state_dict()), 0
            else:
                since += 1
                if since >= args.patience:
                    break
    model.load_state_dict(best_state)
    return {"model": model, "val_top1_bf16": best, "best_step": history[int(np.argmax([h["val_top1"] for h in
                                                                                        history]))]["step"],
            "seconds": time.perf_counter() - t0, "history": history}


def head_report(lh: tuple[int, int], data: dict[str, Split], w: Tensor, w_bf16: Tensor, args) -> dict:
    """Return one head's logit lens, weight-decay choice, chosen fit (train / val / held-out) and learning curve."""
    name = f"L{lh[0]}H{lh[1]}"
    x, t = data["train"].head(lh)
    xv, tv = data["val"].head(lh)
    fits = {wd: fit(x, t, xv, tv, w_bf16, wd, args, f"{name} wd={wd:g}") for wd in args.weight_decays}
    for wd, f in fits.items():
        print(f"{name} wd={wd:g}: val top-1 {f['val_top1_bf16']:.3f} at step {f['best_step']} "
              f"({f['seconds']:.0f} s)", flush=True)
    wd = max(fits, key=lambda k: fits[k]["val_top1_bf16"])
    chosen = fits[wd]["model"]

    def read(c: Tensor) -> Tensor:
        return chosen(c, w)

    n_test = data["test"].seqs
    xt, tt = data["test"].head(lh)
    report = {"head": name, "weight_decay": wd,
              "weight_decay_choice": {f"{k:g}": {"val_top1_bf16": f["val_top1_bf16"], "best_step": f["best_step"],
                                                 "seconds": f["seconds"]} for k, f in fits.items()},
              "logit_lens": {"val": rates(lambda c: c @ w.T, xv, tv, data["val"].seqs),
                             "held_out": rates(lambda c: c @ w.T, xt, tt, n_test)},
              "oracle": {"train": rates(read, *data["train"].head(lh, min(n_test, data["train"].seqs)),
                                        min(n_test, data["train"].seqs)),
                         "val": rates(read, xv, tv, data["val"].seqs),
                         "held_out": rates(read, xt, tt, n_test)},  # the only read of the held-out set
              "history": fits[wd]["history"]}
    curve = []
    for frac in args.curve:
        seqs = max(PER_SEED, round(frac * data["train"].seqs))
        f = fits[wd] if seqs == data["train"].seqs else fit(*data["train"].head(lh, seqs), xv, tv, w_bf16, wd, args,
                                                            f"{name} {seqs} seqs")
        curve.append({"train_seqs": seqs, "train_positions": seqs * (SEQ_LEN - 1),
                      "val": rates(lambda c, m=f["model"]: m(c, w), xv, tv, data["val"].seqs)["top1"],
                      "best_step": f["best_step"], "seconds": f["seconds"]})
        print(f"{name} curve {seqs} seqs: val top-1 {curve[-1]['val']['rate']:.3f}", flush=True)
    report["curve"] = curve
    return report


def fmt(r: dict) -> str:
    """Return `rate [low, high]`."""
    return f"{r['rate']:.3f} [{r['low']:.2f}, {r['high']:.2f}]"


def print_tables(rows: list[dict]) -> None:
    """Print the per-head table and the learning curves (markdown)."""
    print("| head | logit lens held-out top-1 / top-5 | oracle train top-1 | oracle validation top-1 | "
          "oracle held-out top-1 | oracle held-out top-5 | weight decay |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        o, lg = r["oracle"], r["logit_lens"]["held_out"]
        print(f"| {r['head']} | {fmt(lg['top1'])} / {fmt(lg['top5'])} | {fmt(o['train']['top1'])} | "
              f"{fmt(o['val']['top1'])} | {fmt(o['held_out']['top1'])} | {fmt(o['held_out']['top5'])} | "
              f"{r['weight_decay']:g} |")
    print("\n| head | " + " | ".join(f"{c['train_positions']:,} positions" for c in rows[0]["curve"]) + " |")
    print("|---|" + "---|" * len(rows[0]["curve"]))
    for r in rows:
        print(f"| {r['head']} (validation top-1) | " + " | ".join(fmt(c["val"]) for c in r["curve"]) + " |")


def parse_rank(value: str) -> int | None:
    """Return None for `full`, else a positive int."""
    if value == "full":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--rank must be 'full' or a positive integer, got {value!r}")
    return int(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", nargs="+", default=["L29H1", "L23H2"])
    ap.add_argument("--train-seqs", type=int, default=1280)
    ap.add_argument("--val-seqs", type=int, default=32)
    ap.add_argument("--held-out-seqs", type=int, default=64)
    ap.add_argument("--rank", type=parse_rank, default=None, help="'full' (default) or the rank of D = U V")
    ap.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True, help="a free vocabulary bias")
    ap.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 10.0])
    ap.add_argument("--curve", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=500, help="at most this many minibatch steps per fit")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results-name", default="lens_copy_ceiling.json", help="the results file's name in --out")
    ap.add_argument("--cache", type=Path, default=None, help="a folder to keep the collected positions in")
    ap.add_argument("--quick", action="store_true", help="a ~1-minute smoke run, not a measurement")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                                                             "--quick writes nothing without it)")
    args = ap.parse_args()
    if args.quick:
        args.heads, args.train_seqs, args.val_seqs, args.held_out_seqs = args.heads[:1], 32, 8, 8
        args.weight_decays, args.curve, args.steps, args.eval_every = args.weight_decays[:1], [0.5, 1.0], 12, 4
    out = args.out or (None if args.quick else OUT)
    if SEEDS["val"] + args.val_seqs // PER_SEED > SEEDS["train"] or args.held_out_seqs // PER_SEED > SEEDS["val"]:
        raise ValueError("the seed ranges of train / validation / held-out overlap: fewer sequences, please")
    torch.set_num_threads(args.threads)
    from loralens.api import load_model

    loaded = load_model("smollm2-135m-instruct")
    heads = check_heads(" ".join(args.heads), list(range(loaded.dims.n_layers)), loaded.dims.n_heads)
    w = folded_unembedding(loaded.adapter, loaded.model)[0].float()  # [V, d]; evaluation in fp32
    w_bf16 = w.to(torch.bfloat16)  # the training GEMM (and early stopping) in bf16
    sizes = {"val": args.val_seqs, "test": args.held_out_seqs, "train": args.train_seqs}
    data = {k: collect(loaded, heads, SEEDS[k], n, f"{k} sequences", args.cache) for k, n in sizes.items()}
    config = {k: v for k, v in vars(args).items() if k not in ("out", "cache", "results_name")}
    config["rank"] = "full" if args.rank is None else args.rank
    rows = []
    for lh in heads:  # the results file is rewritten after each head
        rows.append(head_report(lh, data, w, w_bf16, args))
        if out is not None:
            write_results(out / args.results_name, rows, {
                "benchmark": "oracle ceiling of a per-head linear read-out on copying (issue 21, goal (a))",
                "model": "smollm2-135m-instruct (embedded)", "model_own_top1_held_out": data["test"].model_top1,
                "config": config, "positions": {k: len(s.targets) for k, s in data.items()}, "seeds_first": SEEDS})
    print_tables(rows)


def write_results(file: Path, rows: list[dict], meta: dict) -> None:
    """Write `meta` and `rows` to `file`, keeping the rows of other heads already there from a run of the same
    config (so heads can be run one at a time, e.g. in parallel processes), in `--heads` order of each run."""
    old = json.loads(file.read_text()) if file.exists() else {}
    same = {k: v for k, v in old.get("config", {}).items() if k not in ("heads", "threads")} == {
        k: v for k, v in meta["config"].items() if k not in ("heads", "threads")}
    mine = {r["head"] for r in rows}
    kept = [r for r in old.get("heads", []) if r["head"] not in mine] if same else []
    file.parent.mkdir(parents=True, exist_ok=True)
    config = {**meta["config"], "heads": [r["head"] for r in kept + rows]}
    file.write_text(json.dumps({**meta, "config": config, "heads": kept + rows}, indent=1))


if __name__ == "__main__":
    main()
