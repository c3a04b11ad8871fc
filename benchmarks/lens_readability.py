"""Readable lenses (issue 21, items 1-2): held-out KL and copying read-outs against training text and objective.

Trains lens banks for a few layers of the embedded SmolLM2 with the train stage's objective (`LensSet`: its form,
rank, alpha, learning rate and exact loss; AdamW, micro-batches of 256 tokens, one process, no DeepSpeed launcher)
on the default prompt corpus's training split plus `--text-tokens` of WikiText-2 (`corpus.text_paths`' loader and
windows: `load_training_text`, `text_windows`), for each budget and objective given, then measures on fixed held-out
data (every 10th default prompt, and WikiText windows from the part of the file no budget trains on):

- held-out exact KL per head: each head's own lens alone vs its logit lens (mean, and how many heads are better);
- copying on repeated random tokens (`lens_mechanisms.py`'s input): the top-1 copied-token rate of every head under
  each read-out of `READOUTS` (`loralens.lens.lenses.readout.head_readouts`), the best head per read-out, and how
  many induction heads (attention score >= 0.3) read at least as well as through the logit lens;
- training seconds (one process, this machine: a cost ratio, not a GPU figure).

    python benchmarks/lens_readability.py                                   # the sweep in docs/benchmarks.md
    python benchmarks/lens_readability.py --layers 23 29 --text-tokens 0 12000 --objectives joint
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loralens.config.inputs import DEFAULT_CORPUS
from loralens.config.lens import TrainConfig
from loralens.lens.evaluation.mechanisms import (
    INDUCTION_THRESHOLD,
    CopyPositions,
    copy_positions,
    hit_rates,
    induction_score,
    model_repeated_tokens,
    run_repeated,
)
from loralens.lens.heads.capture import TokenArrays, cache_batch, text_windows, tokenize_prompts
from loralens.lens.lenses.lens_set import FoldedUnembed, LensConfig
from loralens.lens.lenses.objective import LensSet, fidelity
from loralens.lens.lenses.readout import READOUTS, head_readouts
from loralens.lens.runtime.adapters import folded_unembedding, out_proj_weight
from loralens.lens.training.batches import ShardData, to_batch
from loralens.warehouse.corpus import load_corpus, load_training_text

OUT = Path(__file__).resolve().parent / "results"
HELD_OUT_TEXT = 0.25  # WikiText before this fraction of the file is held out; training windows come after it
MICRO_BATCH = 256


def arrays(loaded, seqs: list[list[int]], layers: list[int], first_idx: int, batch: int = 16) -> ShardData:
    """Return the cached training arrays of `seqs` (the cache stage's `cache_batch`), prompt_idx from `first_idx`."""
    parts = [cache_batch(loaded, seqs[b:b + batch], list(range(first_idx + b, first_idx + b + len(seqs[b:b + batch]))),
                         layers, top_k=0, store_dtype="float16")
             for b in tqdm(range(0, len(seqs), batch), desc="cache", leave=False)]
    t = TokenArrays.concat(parts)
    return ShardData(z=np.stack([t.z[layer] for layer in layers], 1), scale=t.scale, h_final=t.h_final,
                     topk_ids=None, topk_logprobs=None, prompt_idx=t.prompt_idx)


def concat(parts: list[ShardData]) -> ShardData:
    return ShardData(**{k: None if getattr(parts[0], k) is None else np.concatenate([getattr(p, k) for p in parts])
                        for k in ShardData.__dataclass_fields__})


def train(lens_set: LensSet, data: ShardData, epochs: int, lr: float, seed: int) -> tuple[float, int]:
    """Fit `lens_set` on `data` (AdamW, micro-batches of 256 shuffled tokens); return (seconds, steps)."""
    opt = torch.optim.AdamW([p for p in lens_set.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    n = len(data.scale)
    steps = epochs * (n // MICRO_BATCH)
    t0 = time.perf_counter()
    with tqdm(total=steps, desc=f"train {lens_set.config.objective}", leave=False) as bar:
        for _ in range(epochs):
            order = rng.permutation(n)
            for s in range(0, n - MICRO_BATCH + 1, MICRO_BATCH):
                loss = lens_set(to_batch(data, order[s:s + MICRO_BATCH], "float16"))
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update()
    return time.perf_counter() - t0, steps


@torch.no_grad()
def copy_rates(pos: CopyPositions, lens_set: LensSet, layers: list[int], w_o: torch.Tensor) -> dict[str, np.ndarray]:
    """Return read-out -> `[L, H]` top-1 copied-token rates at the copy positions `pos`."""
    out = {name: np.zeros((len(layers), w_o.shape[1])) for name in READOUTS}
    for i, layer in enumerate(layers):
        for name, logits in head_readouts(lens_set.banks[i], pos.inputs(layer, w_o[i])).items():
            out[name][i] = (hit_rates(logits, pos.targets, 1)[0].float() / len(pos.targets)).numpy()
    return out


def repeated_windows(tok, text: str, max_len: int, budget: int) -> list[list[int]]:
    """Return windows of at most `max_len` tokens, each the tokenizer's prefix, a span of `text`, then that span again
    (copying for the model to do in natural text), `budget` tokens in all."""
    prefix = len(tok("", add_special_tokens=True)["input_ids"])
    halves = text_windows(tok, text, (max_len + prefix) // 2, budget)
    out, total = [], 0
    for w in halves:
        if total >= budget:
            break
        out.append(w + w[prefix:])
        total += len(out[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[23, 29])
    ap.add_argument("--text-tokens", type=int, nargs="+", default=[0, 12000, 48000, 96000])
    ap.add_argument("--objectives", nargs="+", default=["joint"], choices=["joint", "per_head"])
    ap.add_argument("--per-head-text-tokens", type=int, nargs="*", default=[0],
                    help="budgets the per_head objective also runs at (it costs ~50x joint per token)")
    ap.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat-text", action="store_true",
                    help="training text with copying in it: each window is a span of the text followed by itself")
    ap.add_argument("--random-repeat", type=int, default=0,
                    help="training tokens of repeated random tokens (BOS + 25 random + the same 25; seeds from 1001, "
                         "disjoint from the read-out's seed 0), the model's own output as the target like all text")
    ap.add_argument("--rank", type=int, default=None, help="lens rank (default: the train stage's)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--name", default="lens_readability", help="results file name (without .json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from loralens.api import load_model

    loaded = load_model("smollm2-135m-instruct")
    tok, layers, t = loaded.tokenizer, args.layers, TrainConfig()
    max_len, every = 64, t.eval_every_nth_prompt

    prompts = tokenize_prompts(tok, [p.text for p in load_corpus(DEFAULT_CORPUS, 128).prompts], max_len).ids
    train_prompts = [x for i, x in enumerate(prompts) if i % every and x]
    held_prompts = [x for i, x in enumerate(prompts) if not i % every and x]
    full = load_training_text(["bundled:wikitext2_test"], 0.0).text
    held_text = text_windows(tok, full[: int(len(full) * HELD_OUT_TEXT)], max_len, 1024)
    text = load_training_text(["bundled:wikitext2_test"], HELD_OUT_TEXT).text
    budget = max(args.text_tokens + args.per_head_text_tokens)
    windows = (repeated_windows(tok, text, max_len, budget) if args.repeat_text
               else text_windows(tok, text, max_len, budget))

    if args.random_repeat:
        n_seq = -(-args.random_repeat // 51)
        rand = torch.cat([model_repeated_tokens(loaded, batch=8, seq_len=25, seed=1001 + i)[0]
                          for i in range(-(-n_seq // 8))])[:n_seq]
        rand_data = arrays(loaded, rand.tolist(), layers, 200_000)
    held = concat([arrays(loaded, held_prompts, layers, 0), arrays(loaded, held_text, layers, 10_000)])
    prompt_data = arrays(loaded, train_prompts, layers, 0)
    text_data = arrays(loaded, windows, layers, 100_000) if windows else None
    unembed = FoldedUnembed(*(w.float() for w in folded_unembedding(loaded.adapter, loaded.model)))
    w_o = torch.stack([out_proj_weight(loaded.adapter, loaded.model, layer, loaded.dims).float() for layer in layers])
    lm_head = loaded.model.get_output_embeddings().weight.float()
    reps, offset = model_repeated_tokens(loaded, batch=8, seq_len=25, seed=0)
    run = run_repeated(loaded.model, loaded.adapter, reps)
    induction = induction_score(run.attn, 25, offset)[layers].numpy()  # [L, H]
    pos = copy_positions(run, reps, 25, offset)

    results = []
    plan = [(o, n) for o in args.objectives for n in (args.text_tokens if o == "joint" else args.per_head_text_tokens)]
    for objective, n_text in plan:
        n_rows = int(np.searchsorted(np.cumsum([len(w) for w in windows]), n_text, side="right")) if n_text else 0
        rows = int(sum(len(w) for w in windows[:n_rows]))
        data = prompt_data if not rows else concat([prompt_data, ShardData(
            **{k: None if getattr(text_data, k) is None else getattr(text_data, k)[:rows]
               for k in ShardData.__dataclass_fields__})])
        if args.random_repeat:
            data = concat([data, rand_data])
        cfg = LensConfig(form=t.form, rank=args.rank or t.rank, alpha=t.alpha, objective=objective)
        lens_set = LensSet(unembed, w_o, layers, cfg, lm_head=lm_head, loss="exact", chunk=128,
                           base_dtype=t.base_dtype)
        seconds, steps = train(lens_set, data, args.epochs, t.lr, t.seed)
        fid = fidelity(lens_set, to_batch(held, np.arange(len(held.scale)), "float16"))
        head_kl = (fid["head_lens"] / fid["tokens"]).numpy()
        logit_kl = (fid["head_logit_lens"] / fid["tokens"]).numpy()
        rates = copy_rates(pos, lens_set, layers, w_o)
        ind = induction >= INDUCTION_THRESHOLD
        res = {"objective": objective, "text_tokens": rows, "train_tokens": int(len(data.scale)), "steps": steps,
               "train_seconds": seconds, "held_out_tokens": int(fid["tokens"]),
               "head_kl_mean": float(head_kl.mean()), "logit_kl_mean": float(logit_kl.mean()),
               "heads_better_than_logit": int((head_kl < logit_kl).sum()), "heads": int(head_kl.size),
               "layer_kl": (fid["layer_lens"] / fid["tokens"]).tolist(),
               "copy_top1": {name: r.tolist() for name, r in rates.items()},
               "best_copier": {name: _best(r, layers) for name, r in rates.items()},
               "induction_heads_ge_logit": {name: int((r[ind] >= rates["logit"][ind]).sum())
                                            for name, r in rates.items()},
               "n_induction_heads": int(ind.sum())}
        results.append(res)
        print(row_line(res), flush=True)

    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "lens readability: objective, read-out and training text (issue 21)", "layers": layers,
           "epochs": args.epochs, "model_top1": pos.model_top1, "induction": induction.tolist(),
           "held_out_text_fraction": HELD_OUT_TEXT, "repeat_text": args.repeat_text,
           "random_repeat_tokens": args.random_repeat, "rank": args.rank or t.rank, "readouts": list(READOUTS),
           "results": results,
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                       "torch": torch.__version__}}
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=1))


def _best(rates: np.ndarray, layers: list[int]) -> dict:
    i, h = np.unravel_index(int(rates.argmax()), rates.shape)
    return {"head": f"L{layers[i]}H{h}", "top1": float(rates[i, h])}


def row_line(r: dict) -> str:
    best = "; ".join(f"{k} {v['head']} {v['top1']:.3f}" for k, v in r["best_copier"].items())
    return (f"{r['objective']} +{r['text_tokens']} text tokens: {r['train_seconds']:.0f} s, head KL "
            f"{r['head_kl_mean']:.3f} vs logit {r['logit_kl_mean']:.3f}; best copier {best}")


def table(results: list[dict]) -> str:
    names = list(results[0]["best_copier"]) if results else []
    head = ("| objective | train tokens (text) | train s | head KL / logit lens | heads better | "
            + " | ".join(f"best copy top-1: {n}" for n in names) + " |")
    lines = [head, "|" + "---|" * (5 + len(names))]
    for r in results:
        lines.append(f"| {r['objective']} | {r['train_tokens']} ({r['text_tokens']}) | {r['train_seconds']:.0f} | "
                     f"{r['head_kl_mean']:.3f} / {r['logit_kl_mean']:.3f} | {r['heads_better_than_logit']} of "
                     f"{r['heads']} | " + " | ".join(f"{r['best_copier'][n]['head']} {r['best_copier'][n]['top1']:.3f}"
                                                   for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
