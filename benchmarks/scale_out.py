"""Scale-out on Dask: generation samples/s and cache tokens/s with 1 worker (in this process) vs 2 Dask worker
processes (a local cluster through prefect-dask's DaskTaskRunner), on the embedded SmolLM2-135M, in one run.

Generation: the intervene stage's unit, one `generate_joint` call per (prompt batch) with the stage's default
settings (k, max_new_tokens, top_p, batch_prompts), the model loaded once per process (`stage_model`). 1 worker
runs every unit in this process (torch's default threads); 2 workers map one Prefect task per unit with
`flows.common.map_units` (one torch thread each, Dask's default for worker processes). The texts of both must be
equal. Cache: the cache stage itself, in this process vs its shards mapped on the 2 workers and finalized here
(forced, so it recomputes; the files of both must be identical). The cluster's start and each worker's first
model load are timed apart (a fixed cost per run, not per unit). Rounds alternate 1 and 2 workers and the best
of each counts, to damp the load of other processes on a shared machine. Peak resident memory: this process
for 1 worker, each worker process for 2. Prints a table, writes JSON.

    python benchmarks/scale_out.py [--gen-prompts 32] [--cache-prompts 64] [--rounds 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="loralens-bench-prefect-"))  # not the user's db

from loralens.prefect_env import configure_prefect_env  # noqa: E402

configure_prefect_env()

import torch  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from loralens.config import PipelineConfig, parse_config  # noqa: E402
from loralens.flows.cache import cache_stage  # noqa: E402
from loralens.flows.common import map_units, results_under_home, scale_out  # noqa: E402
from loralens.lens.evaluation.generation import generate_joint, prompt_batches  # noqa: E402
from loralens.tasks.stages.cache import cache_version, run_cache_stage  # noqa: E402
from loralens.tasks.workers.worker_process import stage_model  # noqa: E402
from loralens.warehouse.corpus import load_corpus  # noqa: E402


def prompts(n: int) -> list[str]:
    """Return the first `n` bundled toxic prompts (the intervene stage's kind of input)."""
    return [p.text for p in load_corpus(["bundled:rtp_toxic_dev"], n).prompts][:n]


@task(name="bench-generate", cache_policy=NO_CACHE, persist_result=False)
def generate_units(cfg: PipelineConfig, texts: list[str], units: list[int]) -> list[list[list[str]]]:
    """Generate each unit (prompt batch) like the intervene stage does; return its texts."""
    ic = cfg.intervene
    loaded = stage_model(cfg)
    batches = prompt_batches(len(texts), ic.batch_prompts)
    return [generate_joint(loaded.model, loaded.tokenizer, [texts[i] for i in batches[u]], k=ic.k,
                           max_new_tokens=ic.max_new_tokens, top_p=ic.top_p, seed=ic.seed) for u in units]


def warm_worker(cfg: PipelineConfig) -> float:
    """Load the model in this worker process (kept for its units); return the seconds it took."""
    t0 = time.perf_counter()
    stage_model(cfg)
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Return this process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cache_files(cfg: PipelineConfig) -> list:
    return sorted((f["path"], f["sha256"]) for f in cache_version(cfg).artifact.manifest()["files"])


@flow(name="bench-scale-out")
def bench(cfg: PipelineConfig, gen_prompts: int, rounds: int) -> dict:
    texts = prompts(gen_prompts)
    units = list(range(len(prompt_batches(len(texts), cfg.intervene.batch_prompts))))
    ver = cache_version(cfg)
    out: dict = {"threads_in_process": torch.get_num_threads(), "samples": len(texts) * cfg.intervene.k,
                 "units": len(units), "gen_1": [], "gen_2": [], "cache_1": [], "cache_2": []}
    t0 = time.perf_counter()
    with results_under_home(cfg), scale_out(workers=2) as pool:
        runner = pool.runner()  # starts the local cluster of 2 worker processes
        out["cluster_start"] = time.perf_counter() - t0
        out["worker_model_load"] = list(runner.client.run(warm_worker, cfg).values())
        one = two = None
        for _ in range(rounds):  # alternating, so both sides see the same (shared machine's) load
            t = time.perf_counter()
            one = generate_units.fn(cfg, texts, units)  # 1 worker: this process, as `workers: 1` runs it
            out["gen_1"].append(time.perf_counter() - t)
            t = time.perf_counter()
            two = [r[0] for r in map_units(generate_units, (cfg, texts), units)]  # one task per unit
            out["gen_2"].append(time.perf_counter() - t)
            t = time.perf_counter()
            res = run_cache_stage(cfg, ver, force=True)  # 1 worker: the in-process stage
            out["cache_1"].append(time.perf_counter() - t)
            out["tokens"], files_1 = res["n_tokens"], cache_files(cfg)
            t = time.perf_counter()
            cache_stage(cfg, ver, force=True, workers=2)  # shards mapped on the 2 workers, finalized here
            out["cache_2"].append(time.perf_counter() - t)
            out["cache_files_equal"] = cache_files(cfg) == files_1
        out["texts_equal"] = one == two
        out["peak_rss_mb_2"] = list(runner.client.run(peak_rss_mb).values())
    out["peak_rss_mb_1"] = peak_rss_mb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gen-prompts", type=int, default=32)
    parser.add_argument("--cache-prompts", type=int, default=64, help="prompts per bundled file (2 files)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each side counts")
    parser.add_argument("--home", default=None, help="project home (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="loralens-bench-scale-"))
    cfg = parse_config({"home": str(home), "corpus": {"max_prompts_per_file": args.cache_prompts},
                        "cache": {"prompts_per_shard": 32}})
    stage_model(cfg)  # converts the embedded GGUF model once (~20 s), before anything is timed
    load_before = os.getloadavg()
    r = bench(cfg, args.gen_prompts, args.rounds)
    r["loadavg_before"], r["loadavg_after"] = load_before, os.getloadavg()
    rows = [
        ("generation samples/s", r["samples"] / min(r["gen_1"]), r["samples"] / min(r["gen_2"])),
        ("cache tokens/s", r["tokens"] / min(r["cache_1"]), r["tokens"] / min(r["cache_2"])),
    ]
    print(f"{'':24}{'1 worker':>12}{'2 workers':>12}{'speed-up':>10}")
    for name, a, b in rows:
        print(f"{name:24}{a:12.1f}{b:12.1f}{b / a:9.2f}x")
    print(f"peak RSS: 1 worker (this process, with Prefect's client) {r['peak_rss_mb_1']:.0f} MB; 2 workers "
          f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mb_2'])} MB each")
    print(f"fixed costs of the 2-worker run: cluster start {r['cluster_start']:.1f} s, first model load per worker "
          f"{', '.join(f'{s:.1f}' for s in r['worker_model_load'])} s; rounds (s): gen 1 {r['gen_1']}, "
          f"gen 2 {r['gen_2']}, cache 1 {r['cache_1']}, cache 2 {r['cache_2']}")
    print(f"texts equal: {r['texts_equal']}; cache files equal: {r['cache_files_equal']}; "
          f"{r['samples']} samples in {r['units']} units; {r['tokens']} cached tokens; "
          f"load average before/after {r['loadavg_before'][0]:.1f}/{r['loadavg_after'][0]:.1f} "
          f"on {os.cpu_count()} cores")
    result = {"benchmark": "scale_out", "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "rows": [{"metric": n, "one_worker": a, "two_workers": b, "speedup": b / a}
                                               for n, a, b in rows], **r}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_out.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out / 'scale_out.json'}")


if __name__ == "__main__":
    main()
