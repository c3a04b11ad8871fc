"""Mechanism check (issue 21): do the heads' lenses read induction / copying (Olsson et al. 2022) where it happens?

On `--batch` sequences `[BOS] + r + r` (r = `--seq-len` random token ids, special tokens excluded, seeded), every
head's induction score and previous-token score (attention patterns, eager attention) and its copy rate: at each
second-copy position with a next token, is that next token (the one an induction head copies) the top-1 / in the
top-5 of the head's output alone, read through the plain logit lens and, with `--home`, through that home's trained
lenses (`open_home(home).lenses()`, the newest complete train version), and with `--effect` from what the head adds
to the model's output (log-probs minus those with the head mean-ablated: every path through later layers, where both
lenses read the head's direct write only; one forward pass per head). Prints the top heads by induction score,
the best copying heads, the model's own top-1 rate, and how many induction heads (induction score >=
`--threshold`) read at least as well through the trained lens as through the logit lens. Writes
benchmarks/results/lens_mechanisms.json and layers x heads heatmaps beside it.

    python benchmarks/lens_mechanisms.py                          # embedded SmolLM2, logit lens only
    python benchmarks/lens_mechanisms.py --home /tmp/home        # and that home's trained lenses
    python benchmarks/lens_mechanisms.py --home /tmp/home --effect   # and every head's effect

Threshold: an induction head puts >= 0.3 of its attention, on average, on the one key the mechanism predicts (the
token after the previous occurrence) among the 27-51 keys a second-copy query sees (L = 25, with BOS). A head
attending uniformly scores ~0.027 there (printed), so 0.3 is ~11x chance; a head attending to BOS or to the previous
token scores ~0. The JSON also counts heads at 0.1, 0.2, 0.3 and 0.5, so the conclusion can be checked for another
threshold.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from loralens.lens.evaluation.mechanisms import (
    COMPARED,
    INDUCTION_THRESHOLD,
    READ_NAMES,
    READS,
    head_name,
    induction_summary,
    mechanism_rows,
    model_mechanism_scores,
)

OUT = Path(__file__).resolve().parent / "results"


def uniform_baseline(seq_len: int, offset: int) -> float:
    """Return the induction score of a head attending uniformly to every earlier position (`1 / (i + 1)`)."""
    second = np.arange(offset + seq_len, offset + 2 * seq_len)
    return float((1.0 / (second + 1)).mean())


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict], effect: bool) -> list[str]:
    """Return the Markdown table of `rows`: induction, previous-token, copy rates through both lenses (and the
    effect)."""
    reads = READS if effect else tuple(r for r in READS if r != "effect")
    keys = ["induction_score", "prev_token_score"] + [f"copy_top{k}_{read}" for read in reads for k in (1, 5)]
    names = ["induction", "prev-token"] + [f"copy top-{k} {read}" for read in reads for k in (1, 5)]
    lines = ["| head | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += ["| " + " | ".join([head_name(r)] + [fmt(r[key]) for key in keys]) + " |" for r in rows]
    return lines


def heatmaps(rows: list[dict], n_layers: int, n_heads: int, out: Path) -> dict[str, str]:
    """Write layers x heads heatmaps of the scores and copy rates (trained ones only when measured)."""
    from loralens.tasks.report import layer_head_heatmap

    def grid(key: str) -> np.ndarray:
        g = np.full((n_layers, n_heads), np.nan)
        for r in rows:
            g[r["layer"], r["head"]] = np.nan if r[key] is None else r[key]
        return g

    layers = list(range(n_layers))
    maps = {"induction_score": ("induction score", "Reds"), "prev_token_score": ("previous-token score", "Reds"),
            "copy_top1_logit": ("copy top-1, logit lens", "Blues"),
            "copy_top1_trained": ("copy top-1, trained lens", "Blues"),
            "copy_top1_effect": ("copy top-1, effect on the output", "Blues")}
    paths = {}
    for key, (title, cmap) in maps.items():
        g = grid(key)
        if np.isfinite(g).any():
            paths[key] = str(layer_head_heatmap(g, layers, out / f"lens_mechanisms_{key}.png", title=title,
                                                cmap=cmap, vmin=0.0, vmax=1.0))
    diff = grid("copy_top1_trained") - grid("copy_top1_logit")
    if np.isfinite(diff).any():
        lim = max(float(np.nanmax(np.abs(diff))), 1e-3)
        paths["copy_top1_trained_minus_logit"] = str(layer_head_heatmap(
            diff, layers, out / "lens_mechanisms_copy_top1_trained_minus_logit.png",
            title="copy top-1: trained - logit lens", cmap="RdBu_r", vmin=-lim, vmax=lim))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="without --home (with it: the home's model)")
    ap.add_argument("--home", type=Path, default=None, help="a project home with trained lenses")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=INDUCTION_THRESHOLD)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--effect", action="store_true", help="also every head's effect read-out (a forward pass each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from loralens.api import load_model, open_home

    if args.home is not None:
        lenses = open_home(args.home).lenses()
        loaded, banks, lens_version = lenses.model, lenses.reader.banks, lenses.version
    else:
        loaded, banks, lens_version = load_model(args.model), None, None
    bos = loaded.tokenizer.bos_token_id
    offset = int(bos is not None)
    t0 = time.perf_counter()
    scores = model_mechanism_scores(loaded, banks, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
                                    effect=args.effect)
    seconds = time.perf_counter() - t0
    rows = mechanism_rows(scores)
    by_induction = sorted(rows, key=lambda r: -r["induction_score"])
    summary = induction_summary(rows, args.threshold)
    best = summary.pop("best_copier")  # kept beside the summary in the JSON, as head names

    print(f"{loaded.path}: {args.batch} x [{'BOS + ' if offset else ''}{args.seq_len} random tokens x 2], seed "
          f"{args.seed}, {scores.n_positions} scored second-copy positions, lenses: "
          f"{'trained ' + lens_version + ' + logit' if banks else 'logit only'}; {seconds:.1f} s")
    print(f"model's own top-1 on the repeat: {scores.model_top1:.3f}")
    print(f"uniform-attention induction score at this length: {uniform_baseline(args.seq_len, offset):.3f}\n")
    print(f"top {args.top} heads by induction score:")
    print("\n".join(table(by_induction[:args.top], args.effect)))
    for read, r in best.items():
        rates = ", ".join(f"{other} {fmt(r[f'copy_top1_{other}'])}" for other in READS)
        print(f"\nbest copying head through the {READ_NAMES[read]}: {r['head']} (top-1 {fmt(r['rate'])}; {rates}; "
              f"induction {fmt(r['induction_score'])})")
    if args.effect:
        print(f"\ntop {args.top} heads by copy top-1 through the effect:")
        print("\n".join(table(sorted(rows, key=lambda r: -r["copy_top1_effect"])[:args.top], True)))
    print(f"\ninduction heads (score >= {args.threshold}): {summary['n_induction_heads']} "
          f"({', '.join(summary['induction_heads'])})")
    for read in COMPARED:
        n = summary["n_with_trained_lens" if read == "trained" else f"n_with_{read}"]
        for k in (1, 5) if n else ():
            print(f"  copy top-{k}: {read} >= logit {summary[f'n_{read}_ge_logit_top{k}']}/{n} (of which both "
                  f"0: {summary[f'n_{read}_both_zero_logit_top{k}']}), {read} > logit "
                  f"{summary[f'n_{read}_gt_logit_top{k}']}/{n}")

    args.out.mkdir(parents=True, exist_ok=True)
    maps = heatmaps(rows, loaded.dims.n_layers, loaded.dims.n_heads, args.out)
    result = {"benchmark": "lens mechanism check: induction / copying on repeated random tokens (issue 21)",
              "model": loaded.path, "home": None if args.home is None else str(args.home),
              "train_version": lens_version, "effect": args.effect, "batch": args.batch, "seq_len": args.seq_len,
              "seed": args.seed,
              "bos": bos, "n_positions": scores.n_positions, "model_top1": scores.model_top1,
              "uniform_induction_baseline": uniform_baseline(args.seq_len, offset), "summary": summary,
              "best_copier": {lens: r["head"] for lens, r in best.items()},
              "seconds": seconds, "heatmaps": {k: Path(v).name for k, v in maps.items()}, "heads": rows,
              "machine": {"torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__}}
    path = args.out / "lens_mechanisms.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path} and {len(maps)} heatmaps")


if __name__ == "__main__":
    main()
