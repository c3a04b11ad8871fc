"""P1: caching throughput / bare HF forward throughput, side by side in one run, on the real SmolLM2.

Both sides see the same prompts in the same batches (the cache stage's own shard and batch order). The
bare side only runs `model(...)`; the cache side is the whole `cache` stage (hooks, target top-k,
fp16 conversion, Parquet + zstd, checksums, manifest, DuckDB registration). Rounds alternate and the
best round of each side counts, to damp noise from other processes. `ratio` is end to end (including
the stage's own model load and tokenization); `ratio_loop_only` times the stage's batch loop (forward,
extraction and writes) against the same bare forward. Prints a table, writes JSON.

    python benchmarks/cache_throughput.py [--prompts-per-file 128] [--rounds 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from loralens.config import default_home, parse_config
from loralens.lens.heads.capture import effective_max_length, pad_batch, tokenize_prompts
from loralens.lens.runtime.models import load_model
from loralens.tasks.stages.cache import _shard_prompts, cache_version, run_cache_stage
from loralens.warehouse.corpus import load_corpus


def bare_forward_seconds(loaded, cfg) -> tuple[float, int]:
    """Return (seconds, tokens) of plain forward passes over the cache stage's own batches."""
    corpus = load_corpus(cfg.corpus.paths, cfg.corpus.max_prompts_per_file)
    tok = tokenize_prompts(loaded.tokenizer, [p.text for p in corpus.prompts],
                           effective_max_length(loaded, cfg.cache.max_length))
    batches = []
    for idxs in _shard_prompts(corpus, tok.ids, cfg.cache.prompts_per_shard):
        order = sorted(idxs, key=lambda i: (-len(tok.ids[i]), i))
        for b in range(0, len(order), cfg.cache.batch_size):
            batches.append(pad_batch([tok.ids[i] for i in order[b : b + cfg.cache.batch_size]],
                                     loaded.tokenizer.pad_token_id))
    tokens = sum(int(m.sum()) for _, m in batches)
    start = time.perf_counter()
    with torch.no_grad():
        for ids, mask in batches:
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts-per-file", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    model_home = default_home()
    loaded = load_model("smollm2-135m-instruct", model_home)
    rows = []
    for r in range(args.rounds):
        scratch = Path(tempfile.mkdtemp(prefix="loralens-bench-"))
        try:
            cfg = parse_config({"home": str(scratch), "model": {"name": loaded.path},
                                "corpus": {"max_prompts_per_file": args.prompts_per_file}})
            bare_s, tokens = bare_forward_seconds(loaded, cfg)
            start = time.perf_counter()
            summary = run_cache_stage(cfg, cache_version(cfg))
            cache_s = time.perf_counter() - start
            assert summary["n_tokens"] == tokens
            rows.append({"round": r, "tokens": tokens, "bare_s": bare_s, "cache_s": cache_s,
                         "cache_setup_s": summary["seconds_setup"], "cache_loop_s": summary["seconds_loop"],
                         "bare_tok_s": tokens / bare_s, "cache_tok_s": tokens / cache_s,
                         "cache_loop_tok_s": tokens / summary["seconds_loop"],
                         "bytes_per_token": summary["bytes_per_token"]})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    best_bare = max(r["bare_tok_s"] for r in rows)
    best_cache = max(r["cache_tok_s"] for r in rows)
    best_loop = max(r["cache_loop_tok_s"] for r in rows)
    d = loaded.dims
    result = {
        "benchmark": "P1 cache throughput",
        "model": "SmolLM2-135M-Instruct", "layers": d.n_layers, "heads": d.n_heads, "d_model": d.d_model,
        "tokens": rows[0]["tokens"], "rounds": rows,
        "bare_tokens_per_s": best_bare, "cache_tokens_per_s": best_cache, "ratio": best_cache / best_bare,
        "cache_loop_tokens_per_s": best_loop, "ratio_loop_only": best_loop / best_bare,
        "goal_ratio": 0.90,
        "bytes_per_token": rows[0]["bytes_per_token"],
        "z_bytes_per_token_raw": d.n_layers * d.z_width * 2,
        "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    print(f"{'metric':<34}{'value':>14}")
    print("-" * 48)
    for key in ("tokens", "bare_tokens_per_s", "cache_tokens_per_s", "ratio", "cache_loop_tokens_per_s",
                "ratio_loop_only", "bytes_per_token",
                "z_bytes_per_token_raw"):
        value = result[key]
        print(f"{key:<34}{value:>14.3f}" if isinstance(value, float) else f"{key:<34}{value:>14}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_throughput.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'cache_throughput.json'}")


if __name__ == "__main__":
    main()
