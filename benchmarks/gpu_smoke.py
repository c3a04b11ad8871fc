"""GPU smoke run: the GPU paths users will run, each a row of real pipeline stages (in this process, one
`pipeline(only=stage)` call per stage, as `loralens run --only STAGE` runs them).

row                 GPUs  stages                what it covers
default x1          1     all six               the embedded SmolLM2-135M on `cuda`, dtype auto (bf16)
8b x1               1     all six               the 2-layer Llama-3-8B-shaped model (scale_llama3_8b.py), 1 rank
8b x2 zero2 bf16    2     cache, train, decode  2 ranks, ZeRO-2, bf16 lens parameters (fp32 masters saved)
8b x2 zero3 bf16    2     cache, train, decode  the same at ZeRO-3
8b x8 zero2 bf16    8     cache, train, decode  8 ranks, ZeRO-2, bf16 lenses
8b x8 zero3 bf16    8     cache, train, decode  8 ranks, ZeRO-3, bf16 lenses
8b device_map auto  2     all six               `model.device_map: auto`: cache, select and intervene spread
                                                the model over every visible GPU
default dask x2     2     all six               `run.workers: 2`: 2 local Dask workers, one GPU each

A row needing more GPUs than the machine has is printed `skipped: N GPUs here`. Every row's config is a valid
PipelineConfig whose cache has at least one shard per training rank (`cache.prompts_per_shard` = prompts / ranks),
checked before anything runs (`check_rows`, also under `--plan`, which needs no GPU).

Per row and stage: wall time, peak GPU memory (`torch.cuda.max_memory_allocated` of this process over its GPUs, and
of training rank 0 from the train summary), the largest growth of any GPU's used memory during the stage through
NVML (every process: Dask workers and all ranks; `-` without `pynvml`), and tokens/s (cache: tokens run through
the model; train: tokens trained on; decode: positions read). A stage that fails ends its row with the error's
first line; the other rows still run; the exit status is then 1. Prints a table, writes JSON.

Sizing (the whole run, `gpu_smoke.sh`, under 8 minutes on one GPU): 64 prompts (32 per file) of at most 32
tokens per rank, 1 epoch, the reduced select and intervene of `scale_llama3_8b.pipeline_config` (4 prompts, 8 new
tokens, one head set). Estimated on one H100, not measured (no GPU has run this yet): the 8B-shaped model built
once on the host ~1 min (kept in --work), the embedded model converted once ~20 s, each stage ~5-20 s (Prefect
flow, model load, DeepSpeed start-up for train; the compute is seconds at this size): default x1 ~1.5 min, 8b x1
~2 min, the `gpu` tests before it ~2 min; ~6-7 min in all. On 8 GPUs all 8 rows run: ~12 minutes.

    bash benchmarks/gpu_smoke.sh     (or: python benchmarks/gpu_smoke.py [--work DIR] [--only ROW ...] [--skip-8b])
    python benchmarks/gpu_smoke.py --plan [--gpus 8]      the rows and their configs, checked; runs nothing
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loralens.config import PipelineConfig, parse_config
from loralens.config.inputs import DEFAULT_MODEL
from loralens.lens.memory.gpu_free import nvml_free_bytes
from loralens.tasks.stages.train import check_enough_shards
from loralens.warehouse.constants import STAGES
from loralens.warehouse.corpus import load_corpus

try:
    from benchmarks.scale_llama3_8b import build_model, pipeline_config
except ModuleNotFoundError:  # run as a script: benchmarks/ is sys.path[0]
    from scale_llama3_8b import build_model, pipeline_config

GIB = 2**30
PROMPTS_PER_RANK = 64  # scale_llama3_8b.pipeline_config's 64 prompts at scale 1
TRAINING = ("cache", "train", "decode")


@dataclass(frozen=True)
class SmokeRow:
    """One path of the smoke run: a pipeline config run stage by stage on `gpus` GPUs at least."""

    name: str
    gpus: int
    stages: tuple[str, ...]
    config: dict[str, Any] = field(hash=False)
    covers: str = ""

    def skip_reason(self, gpus_here: int) -> str | None:
        """Return why the row cannot run on a machine with `gpus_here` GPUs (None: it runs)."""
        return f"skipped: {gpus_here} GPUs here" if gpus_here < self.gpus else None


def smoke_config(home: Path, model: str | Path, ranks: int = 1, shards: int | None = None,
                 overrides: dict[str, dict] | None = None) -> dict:
    """Return a reduced pipeline config on `cuda` (dtype auto): `PROMPTS_PER_RANK` prompts per training rank in
    `shards` cache shards (default: one per rank, so every rank gets its own), 1 epoch, `train.world_size` ranks;
    `overrides` ({section: {key: value}}) are merged into the sections of the same name."""
    raw = pipeline_config(home, model, ranks)
    prompts = PROMPTS_PER_RANK * ranks
    raw["model"] = {**raw["model"], "name": str(model), "device": "cuda", "dtype": "auto"}
    raw["cache"] = {**raw["cache"], "prompts_per_shard": prompts // (shards or ranks)}
    raw["train"] = {**raw["train"], "world_size": ranks}
    for name, values in (overrides or {}).items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def smoke_rows(work: Path, default_model: str | Path, model_8b: Path) -> list[SmokeRow]:
    """Return every row of the smoke run (each with its own home under `work`), whatever this machine has."""
    def home(name: str) -> Path:
        return work / "homes" / name.replace(" ", "-")

    rows = [SmokeRow("default x1", 1, STAGES, smoke_config(home("default x1"), default_model),
                     "the embedded model on cuda, dtype auto"),
            SmokeRow("8b x1", 1, STAGES, smoke_config(home("8b x1"), model_8b),
                     "Llama-3-8B-shaped, 2 layers, 1 rank, ZeRO-2, fp32 lenses")]
    for ranks in (2, 8):
        for zero in (2, 3):
            name = f"8b x{ranks} zero{zero} bf16"
            rows.append(SmokeRow(name, ranks, TRAINING, smoke_config(
                home(name), model_8b, ranks, overrides={"train": {"zero_stage": zero, "param_dtype": "bfloat16"}}),
                f"{ranks} ranks, ZeRO-{zero}, bf16 lens parameters"))
    spread = smoke_config(home("8b device_map auto"), model_8b, overrides={"model": {"device_map": "auto"}})
    rows.append(SmokeRow("8b device_map auto", 2, STAGES, spread,
                         "model.device_map auto: cache, select, intervene spread over every visible GPU"))
    rows.append(SmokeRow("default dask x2", 2, STAGES,
                         smoke_config(home("default dask x2"), default_model, shards=2,
                                      overrides={"run": {"workers": 2}, "intervene": {"batch_prompts": 2}}),
                         "run.workers 2: a local Dask worker per GPU (2 cache shards, 2 generation units)"))
    return rows


def cache_shards(cfg: PipelineConfig) -> int:
    """Return the prompt shards the cache stage will write for `cfg` (the corpus's prompts, whole shards)."""
    n_prompts = len(load_corpus(cfg.corpus.paths, cfg.corpus.max_prompts_per_file).prompts)
    return math.ceil(n_prompts / cfg.cache.prompts_per_shard)


def check_rows(rows: list[SmokeRow]) -> dict[str, PipelineConfig]:
    """Return every row's validated PipelineConfig; raise (one line) where a config is invalid or a training rank
    would get no cache shard (`check_enough_shards`)."""
    out = {}
    for row in rows:
        cfg = parse_config(row.config)
        if "train" in row.stages:
            check_enough_shards(cfg.train, cache_shards(cfg))
        out[row.name] = cfg
    return out


def plan_text(rows: list[SmokeRow], gpus_here: int) -> str:
    """Return the rows as `--plan` prints them: status on this machine, settings, stages, and each config."""
    lines = []
    for row in rows:
        cfg = parse_config(row.config)
        t = cfg.train
        lines.append(f"{row.name:<20} {row.gpus} GPU(s)  {row.skip_reason(gpus_here) or 'runs'}: {row.covers}")
        lines.append(f"  stages {', '.join(row.stages)}; world_size {t.world_size}, zero_stage {t.zero_stage}, "
                     f"param_dtype {t.param_dtype}, device_map {cfg.model.device_map}, workers {cfg.run.workers}, "
                     f"{cache_shards(cfg)} cache shard(s) of {cfg.cache.prompts_per_shard} prompts")
        lines.extend("    " + line for line in yaml.safe_dump(row.config, sort_keys=False).splitlines())
    return "\n".join(lines)


class GpuUseWatch:
    """Poll every GPU's free memory through NVML (`nvml_free_bytes`, all processes, no CUDA context) while a stage
    runs; `grown` is the largest drop of any GPU's free memory below its value at the start (None without NVML)."""

    def __init__(self, gpus: int, every_s: float = 0.2) -> None:
        self.names = tuple(f"cuda:{i}" for i in range(gpus))
        self.every_s = every_s
        self.start = nvml_free_bytes(self.names) if gpus else None
        self.low = dict(self.start or {})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            now = nvml_free_bytes(self.names) or {}
            self.low = {gpu: min(b, now.get(gpu, b)) for gpu, b in self.low.items()}

    def __enter__(self) -> GpuUseWatch:
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def grown(self) -> int | None:
        """Return the largest growth of one GPU's used memory since the start (bytes), or None without NVML."""
        return None if self.start is None else max(self.start[g] - self.low[g] for g in self.start)


STAGE_TOKENS = {"cache": "n_tokens", "train": "train_tokens", "decode": "positions"}


def run_row(row: SmokeRow, gpus: int) -> list[dict[str, Any]]:
    """Run the row's stages in order in this process; return one result row per stage (a failed stage: its error's
    first line, and the row's later stages are not run)."""
    import torch

    from loralens.flows.pipeline import pipeline

    out = []
    for stage in row.stages:
        torch.cuda.empty_cache()  # blocks cached by an earlier stage would hide this one's growth from NVML
        for d in range(gpus):
            torch.cuda.reset_peak_memory_stats(d)
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"row": row.name, "stage": stage}
        with GpuUseWatch(gpus) as watch:
            try:
                res = pipeline(config=row.config, only=stage)[stage]
            except Exception as err:  # noqa: BLE001 - a smoke run reports every row's failure, then exits 1
                res, entry["error"] = None, (str(err).strip().splitlines() or [type(err).__name__])[0]
        wall = time.perf_counter() - t0
        peak = max((torch.cuda.max_memory_allocated(d) for d in range(gpus)), default=0)
        if res and res.get("cuda_peak_bytes"):
            peak = max(peak, res["cuda_peak_bytes"])
        tokens = res.get(STAGE_TOKENS.get(stage, ""), None) if res else None
        entry |= {"wall_s": wall, "gpu_peak_bytes": peak, "gpu_used_bytes": watch.grown,
                  "tokens_per_s": tokens / wall if tokens else None}
        out.append(entry)
        print(format_row(entry), flush=True)
        if "error" in entry:
            break
    return out


def format_row(r: dict[str, Any]) -> str:
    """Return one line of the table (a skipped row, a stage's figures, or its error)."""
    if "skipped" in r:
        return f"{r['row']:<20} {'-':<10} {r['skipped']}"
    gib = lambda b: f"{b / GIB:8.2f}" if b is not None else f"{'-':>8}"  # noqa: E731
    tps = f"{r['tokens_per_s']:9.0f}" if r.get("tokens_per_s") else f"{'-':>9}"
    line = (f"{r['row']:<20} {r['stage']:<10} {r['wall_s']:8.1f} {gib(r['gpu_peak_bytes'])} "
            f"{gib(r['gpu_used_bytes'])} {tps}")
    return line + (f"  FAILED: {r['error']}" if "error" in r else "")


HEADER = f"{'row':<20} {'stage':<10} {'wall s':>8} {'peak GB':>8} {'used GB':>8} {'tokens/s':>9}"


def write_result(path: Path, results: list[dict[str, Any]], total_s: float, gpus: int, device: str) -> dict:
    """Write the run's JSON (rows, total time, the machine) to `path`; return it."""
    import torch

    result = {"benchmark": "GPU smoke", "rows": results, "total_s": total_s, "gpus": gpus, "device": device,
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def select_rows(rows: list[SmokeRow], only: list[str] | None, skip_8b: bool) -> list[SmokeRow]:
    """Return the rows named in `only` (all when None), less the 8B-shaped model's with `skip_8b`; an unknown name
    is a one-line SystemExit listing the rows."""
    unknown = sorted(set(only or ()) - {r.name for r in rows})
    if unknown:
        sys.exit(f"gpu_smoke: no row named {', '.join(unknown)}; rows: {', '.join(r.name for r in rows)}")
    return [r for r in rows if (not only or r.name in only) and not (skip_8b and r.name.startswith("8b"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/loralens-gpu-smoke")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--only", nargs="+", metavar="ROW", help="run only these rows (names as --plan prints them)")
    parser.add_argument("--skip-8b", action="store_true", help="leave out the rows of the 8B-shaped model")
    parser.add_argument("--plan", action="store_true", help="print and check the rows; run nothing (no GPU needed)")
    parser.add_argument("--gpus", type=int, help="with --plan: plan for this many GPUs (default: this machine's)")
    args = parser.parse_args()
    import torch

    work = Path(args.work).resolve()
    model_8b = work / "llama3-8b-2layer"
    if args.plan:
        rows = select_rows(smoke_rows(work, DEFAULT_MODEL, model_8b), args.only, args.skip_8b)
        check_rows(rows)
        print(plan_text(rows, torch.cuda.device_count() if args.gpus is None else args.gpus))
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_smoke: no CUDA device here; run it on a GPU machine (or --plan)")
    from loralens.lens.runtime.models import resolve_model_path

    t0 = time.perf_counter()
    gpus = torch.cuda.device_count()
    work.mkdir(parents=True, exist_ok=True)
    default_model = resolve_model_path(DEFAULT_MODEL, work / "embedded")  # converted once, for every row
    rows = select_rows(smoke_rows(work, default_model, model_8b), args.only, args.skip_8b)
    check_rows(rows)  # every config valid, a cache shard per rank, before anything runs
    if any(r.skip_reason(gpus) is None and r.config["model"]["name"] == str(model_8b) for r in rows):
        build_model(model_8b)
    print(HEADER, flush=True)
    results: list[dict[str, Any]] = []
    for row in rows:
        skip = row.skip_reason(gpus)
        if skip:
            results.append({"row": row.name, "skipped": skip})
            print(format_row(results[-1]), flush=True)
        else:
            results += run_row(row, gpus)
    total = time.perf_counter() - t0
    device = torch.cuda.get_device_name(0)
    print(f"\n{HEADER}")
    for r in results:
        print(format_row(r))
    print(f"total {total:.0f} s on {gpus} x {device}")
    out = Path(args.out) / "gpu_smoke.json"
    write_result(out, results, total, gpus, device)
    print(f"wrote {out}")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
