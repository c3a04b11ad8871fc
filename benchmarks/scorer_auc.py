"""Scorer quality and speed on the bundled labelled data: ROC AUC per label and scoring throughput.

Datasets: `loralens/data/jigsaw_sample.csv` (Jigsaw comments, one 0/1 column per label; the scorer's labels that
exist as columns are evaluated) and `loralens/data/toxigen_sentences.jsonl` (`label` 1 = implicit hate, scored
against the scorer's overall toxicity label and, when present, `identity_hate`). Throughput is texts/s of the
whole `score()` call (tokenize + forward), best of `--rounds`. Prints a table, writes JSON.

    python benchmarks/scorer_auc.py [--scorer jigsaw-lstm] [--batch-size 64] [--rounds 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from loralens.lens.evaluation.scorers import get_scorer, primary_label, roc_auc

DATA = Path(__file__).resolve().parents[1] / "loralens" / "data"


def load_jigsaw(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Return (texts, {label column: int array}) from the Jigsaw sample CSV."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    label_cols = [c for c in rows[0] if c not in ("id", "comment_text")]
    return [r["comment_text"] for r in rows], {c: np.array([int(r[c]) for r in rows]) for c in label_cols}


def load_toxigen(path: Path) -> tuple[list[str], np.ndarray]:
    """Return (texts, 0/1 hate labels) from the ToxiGen sentences JSONL."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], np.array([int(r["label"]) for r in rows])


def timed_score(scorer, texts: list[str], batch_size: int, rounds: int) -> tuple[dict[str, np.ndarray], float]:
    """Return (scores, best texts/s over `rounds` full passes)."""
    best, scores = 0.0, {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        scores = scorer.score(texts, batch_size=batch_size)
        best = max(best, len(texts) / (time.perf_counter() - t0))
    return scores, best


def evaluate(scorer, batch_size: int, rounds: int) -> list[dict]:
    """Return one result row per (dataset, label) with n, positives, AUC and throughput."""
    rows = []
    texts, labels = load_jigsaw(DATA / "jigsaw_sample.csv")
    scores, tps = timed_score(scorer, texts, batch_size, rounds)
    for label in scorer.labels:
        y = labels.get(label)
        if y is not None and 0 < y.sum() < len(y):
            rows.append(dict(dataset="jigsaw_sample", label=label, n=len(y), positives=int(y.sum()),
                             auc=roc_auc(y, scores[label]), texts_per_s=tps))
    texts, y = load_toxigen(DATA / "toxigen_sentences.jsonl")
    scores, tps = timed_score(scorer, texts, batch_size, rounds)
    for label in dict.fromkeys([primary_label(scorer), "identity_hate"]):
        if label in scores:
            rows.append(dict(dataset="toxigen_sentences", label=label, n=len(y), positives=int(y.sum()),
                             auc=roc_auc(y, scores[label]), texts_per_s=tps))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scorer", default="jigsaw-lstm")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()

    t0 = time.perf_counter()
    scorer = get_scorer(args.scorer)
    load_s = time.perf_counter() - t0
    rows = evaluate(scorer, args.batch_size, args.rounds)

    print(f"scorer {scorer.name} ({scorer.version}), load {load_s:.2f} s, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'dataset':<18} {'label':<14} {'n':>5} {'pos':>5} {'AUC':>7} {'texts/s':>9}")
    for r in rows:
        print(f"{r['dataset']:<18} {r['label']:<14} {r['n']:>5} {r['positives']:>5} {r['auc']:>7.4f} "
              f"{r['texts_per_s']:>9.0f}")

    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(scorer=scorer.name, version=scorer.version, batch_size=args.batch_size, rounds=args.rounds,
                  load_s=load_s, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                  python=platform.python_version(), machine=platform.machine(), rows=rows)
    path = args.out / "scorer_auc.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
