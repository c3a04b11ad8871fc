"""Do the top toxic heads read as toxic? Each head's top tokens through its trained lens, its logit lens and its
effect on the model's output, on toxic prompts (issue 21: "the top toxic heads decode to ' I', ' the', '-'").

For a home after a default run: the top `--heads` heads of `--method` (the newest attribute version's head scores),
and, as a control, `--control-heads` random other lensed heads (`--seed`), read at the last position of the
first `--prompts` toxic prompts of the home (toxicity >= 0.5, prompt order) with
`Lenses.decode(..., effect=True)`: the trained lens and the logit lens (the head's output alone, as decode stores
it) and the effect (the tokens the head adds the most probability to in the model's own output, against the model
with the head mean-ablated over 4,096 WikiText tokens). Per head and read-out: the share of its top-`k` tokens that
are toxic (token toxicity >= 0.5, the decode version's vocabulary scores, as the attribute stage counts them) and the
mean toxicity of those tokens; for the effect also the expected toxicity the head adds to the model's output. The
vocabulary's own toxic share is the chance level. Prints a table and each head's most frequent top tokens per
read-out, and the top head's three read-outs at the end of `--example`; writes
benchmarks/results/lens_effect_readability.json.

    python benchmarks/lens_effect_readability.py --home .loralens [--method lens_contrast] [--heads 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "results"
READS = ("trained", "logit", "effect")
TOXIC = 0.5  # a token is toxic at this score (heads.token_threshold's default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--method", default="lens_contrast")
    ap.add_argument("--heads", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--control-heads", type=int, default=10, help="random other heads read the same way (control)")
    ap.add_argument("--seed", type=int, default=0, help="draws the control heads")
    ap.add_argument("--example", default="Shut up, you stupid", help="a prompt read for the top head, printed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import loralens

    home = loralens.open(args.home)
    scores = home.head_scores(args.method).sort_by("rank").slice(0, args.heads).to_pylist()
    top = [f"L{r['layer']}H{r['head']}" for r in scores]
    prompts = home.sql("SELECT text FROM prompts WHERE toxicity >= 0.5 ORDER BY prompt_idx LIMIT ?",
                       [args.prompts])["text"].to_pylist()
    lenses = home.lenses()
    if lenses.vocab_tox is None:
        raise SystemExit(f"{args.home}: no token toxicity (run the decode stage first)")
    tox = lenses.vocab_tox.cpu().numpy()
    others = [f"L{la}H{h}" for la in lenses.layers for h in range(lenses.n_heads) if f"L{la}H{h}" not in top]
    rng = np.random.default_rng(args.seed)
    control = sorted(rng.choice(others, size=min(args.control_heads, len(others)), replace=False).tolist())
    heads = top + control
    t0 = time.perf_counter()
    lenses.effect_means()
    means_s = time.perf_counter() - t0
    tokens: dict[tuple[str, str], Counter] = {(h, r): Counter() for h in heads for r in READS}
    hits: dict[tuple[str, str], list[float]] = {(h, r): [] for h in heads for r in READS}
    added: dict[str, list[float]] = {h: [] for h in heads}
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    for prompt in tqdm(prompts, desc="prompts", unit="prompt"):
        table = lenses.decode(prompt, heads=heads, k=args.k, position="last", effect=True).table.to_pylist()
        for r in table:
            head = f"L{r['layer']}H{r['head']}"
            tokens[head, r["lens"]][r["token"]] += 1
            hits[head, r["lens"]].append(float(tox[r["token_id"]]))
            if r["lens"] == "effect" and r["rank"] == 1:
                added[head].append(r["expected_toxicity"])
    decode_s = time.perf_counter() - t0

    chance = float((tox >= TOXIC).mean())
    rows = []
    ranked = [(s["rank"], head, s["score"]) for s, head in zip(scores, top, strict=True)]
    for rank, head, score in ranked + [(None, head, None) for head in control]:
        row = {"group": "top" if rank is not None else "control", "rank": rank, "head": head, "score": score,
               "effect_added_toxicity": float(np.mean(added[head]))}
        for read in READS:
            v = np.asarray(hits[head, read])
            row[f"toxic_share_{read}"] = float((v >= TOXIC).mean())
            row[f"mean_tox_{read}"] = float(v.mean())
            row[f"frequent_{read}"] = [t for t, _ in tokens[head, read].most_common(5)]
        rows.append(row)
    def group_mean(group: str, key: str) -> float:
        return float(np.mean([r[key] for r in rows if r["group"] == group]))

    keys = [f"toxic_share_{read}" for read in READS] + ["effect_added_toxicity"]
    mean = {group: {key: group_mean(group, key) for key in keys} for group in ("top", "control")}

    q = lambda t: json.dumps(t, ensure_ascii=False)  # noqa: E731
    print(f"{args.home}: top {len(top)} heads by {args.method} and {len(control)} random other heads (seed "
          f"{args.seed}, the control), last position of {len(prompts)} toxic prompts, top-{args.k} tokens; vocabulary "
          f"toxic share (chance) {chance:.4f}; means {means_s:.0f} s, decode {decode_s:.0f} s\n")
    print("| rank | head | toxic share of top-k: trained | logit | effect | toxicity the effect adds |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rank'] or 'control'} | {r['head']} | {r['toxic_share_trained']:.3f} | "
              f"{r['toxic_share_logit']:.3f} | {r['toxic_share_effect']:.3f} | {r['effect_added_toxicity']:+.4f} |")
    for group, m in mean.items():
        print(f"| | mean, {group} | {m['toxic_share_trained']:.3f} | {m['toxic_share_logit']:.3f} | "
              f"{m['toxic_share_effect']:.3f} | {m['effect_added_toxicity']:+.4f} |")
    print()
    for r in rows:
        print(f"{r['head']}: " + "; ".join(f"{read}: {', '.join(q(t) for t in r[f'frequent_{read}'])}"
                                           for read in READS))
    example = lenses.decode(args.example, heads=top[0], k=args.k, position="last", effect=True)
    example_rows = {read: [(t, round(p, 6)) for t, p in example.top(top[0], lens=read)] for read in READS}
    print(f"\n{top[0]} at the end of {q(args.example)}: " + "; ".join(
        f"{read}: {', '.join(f'{q(t)} {p:.2g}' for t, p in example_rows[read])}" for read in READS))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "lens_effect_readability.json"
    path.write_text(json.dumps({
        "benchmark": "top toxic heads' top tokens: trained lens, logit lens, effect on the output (issue 21)",
        "home": str(args.home), "train_version": lenses.version, "method": args.method, "k": args.k,
        "n_prompts": len(prompts), "toxic_threshold": TOXIC, "vocabulary_toxic_share": chance,
        "control_seed": args.seed, "control_heads": control, "means_by_group": mean,
        "example": {"prompt": args.example, "head": top[0], "top": example_rows},
        "seconds": {"means": means_s, "decode": decode_s}, "heads": rows,
        "machine": {"torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__}}, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
