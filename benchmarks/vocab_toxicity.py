"""Toxicity of every token of a real tokenizer: counts per piece kind, dedup speed-up, the most toxic tokens.

Scores the whole vocabulary twice: with dedup (`vocab_toxicity`, each distinct stripped lowercase text once) and
without (every word/subword token's text scored on its own), checks both give the same scores, and reports the
seconds of each (best of `--rounds`). Prints a table, writes JSON.

    python benchmarks/vocab_toxicity.py [--model smollm2-135m-instruct] [--scorer jigsaw-lstm] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from loralens.config import default_home
from loralens.lens.evaluation.scorers import get_scorer
from loralens.lens.evaluation.vocab_toxicity import KINDS, token_texts, top_tokens, vocab_toxicity
from loralens.lens.runtime.models import load_model


def best_time(fn, rounds: int):
    """Return (last result, best seconds over `rounds` calls of fn())."""
    best, out = float("inf"), None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--scorer", default="jigsaw-lstm")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()

    tokenizer = load_model(args.model, default_home()).tokenizer
    scorer = get_scorer(args.scorer)
    texts = token_texts(tokenizer)

    vt, dedup_s = best_time(lambda: vocab_toxicity(tokenizer, scorer, batch_size=args.batch_size), args.rounds)
    scored = np.flatnonzero(vt.kind != "non_word")
    every, every_s = best_time(
        lambda: scorer.score([texts[i] for i in scored], batch_size=args.batch_size)[vt.label], args.rounds)
    max_diff = float(np.abs(every - vt.score[scored]).max()) if len(scored) else 0.0

    kinds = {k: int((vt.kind == k).sum()) for k in KINDS}
    toxic_by_kind = {k: int(((vt.kind == k) & (vt.score >= 0.5)).sum()) for k in KINDS}
    top = top_tokens(vt, texts, k=args.top)
    row = dict(model=args.model, scorer=scorer.name, scorer_version=vt.scorer_version, label=vt.label,
               vocab_size=len(texts), tokens_scored=len(scored), distinct_texts_scored=vt.n_scored, kinds=kinds,
               tokens_score_ge_0_5=int((vt.score >= 0.5).sum()), score_ge_0_5_by_kind=toxic_by_kind,
               seconds_dedup=dedup_s, seconds_no_dedup=every_s, speedup=every_s / dedup_s,
               max_abs_diff_dedup_vs_every=max_diff,
               top=[dict(id=i, text=t, score=s, kind=str(vt.kind[i])) for i, t, s in top])

    print(f"{args.model} x {scorer.name} ({vt.scorer_version}, label {vt.label}), batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'vocab size':<34} {row['vocab_size']:>8}")
    for k in KINDS:
        print(f"{'  ' + k:<34} {kinds[k]:>8}   (score >= 0.5: {toxic_by_kind[k]})")
    print(f"{'tokens scored (word + subword)':<34} {row['tokens_scored']:>8}")
    print(f"{'distinct texts scored':<34} {row['distinct_texts_scored']:>8}")
    print(f"{'tokens with score >= 0.5':<34} {row['tokens_score_ge_0_5']:>8}")
    print(f"{'seconds, dedup':<34} {dedup_s:>8.2f}")
    print(f"{'seconds, every token':<34} {every_s:>8.2f}   (speed-up x{row['speedup']:.2f}, "
          f"max |diff| {max_diff:.1e})")
    print(f"\ntop {args.top}:\n{'id':>6}  {'kind':<8} {'score':>6}  text")
    for r in row["top"]:
        print(f"{r['id']:>6}  {r['kind']:<8} {r['score']:>6.3f}  {r['text']!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(batch_size=args.batch_size, rounds=args.rounds, torch=torch.__version__,
                  torch_threads=torch.get_num_threads(), python=platform.python_version(),
                  machine=platform.machine(), **row)
    path = args.out / "vocab_toxicity.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
