"""The `loralens` command line: run the pipeline, show artifact status, verify artifact checksums."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path

from loralens.config import ConfigError, default_home, load_config
from loralens.lens.adapters import UnsupportedArchitectureError
from loralens.lens.lean import LeanLoadError
from loralens.lens.models import ModelLoadError
from loralens.lens.plan import PlanError
from loralens.lens.readout import LensMismatchError
from loralens.lens.scorers import ScorerError
from loralens.lens.stage_memory import MemoryBudgetError
from loralens.tasks.report import stage_detail
from loralens.tasks.train import TrainingInterrupted
from loralens.warehouse.artifacts import ArtifactDir, ArtifactError
from loralens.warehouse.constants import ARTIFACTS_DIR
from loralens.warehouse.corpus import CorpusError
from loralens.warehouse.db import WarehouseLockedError, list_artifacts, warehouse_path

# Errors a user can fix; they print as one line instead of a traceback.
USER_ERRORS = (ConfigError, CorpusError, ModelLoadError, UnsupportedArchitectureError, ArtifactError,
               WarehouseLockedError, TrainingInterrupted, PlanError, LensMismatchError, ScorerError,
               MemoryBudgetError, LeanLoadError)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Return rows as a plain-text table with aligned columns."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def human_bytes(n: int | None) -> str:
    """Return a byte count like '12.3 MB'."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def cmd_run(args: argparse.Namespace) -> int:
    from loralens.flows.pipeline import STAGES, pipeline

    cfg = load_config(args.config)  # validate before Prefect starts its server
    if args.only is not None and args.only not in STAGES:
        raise ConfigError(f"unknown stage '{args.only}'; stages: {', '.join(STAGES)}")
    quiet_user_error_tracebacks()
    overrides = {"home": str(args.home)} if args.home else None
    if args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    results = pipeline(config_path=args.config, config=overrides, only=args.only, force=args.force,
                       workers=args.workers, verify=args.verify)
    rows = [{"stage": stage, "version": res["version"], "result": "cached" if res.get("cached") else "done",
             "detail": stage_detail(stage, res), "path": res.get("path", "")} for stage, res in results.items()]
    print(format_table(rows, ["stage", "version", "result", "detail", "path"]))
    report = next((r["run_report"] for r in results.values() if "run_report" in r), None)
    if report:
        print(f"run report: {report}")
    print(f"warehouse: {warehouse_path(Path(args.home) if args.home else cfg.home)}")
    return 0


class _DropUserErrorTraceback(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; a user error is printed as one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_error_tracebacks() -> None:
    """Install the filter on the loggers Prefect's flow and task engines report failures on."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.flows", "prefect.tasks"):
        logging.getLogger(name).addFilter(_DropUserErrorTraceback())


def cmd_status(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve() if args.home else load_config(args.config).home
    registered = {a["version"]: a for a in list_artifacts(warehouse_path(home))}
    rows = []
    for adir in version_dirs(home):
        reg = registered.get(adir.version, {})
        state = "complete" if adir.is_complete() else f"incomplete ({len(adir.done_shards())} shards done)"
        rows.append({"stage": adir.stage, "version": adir.version, "state": state,
                     "rows": reg.get("rows") or "-", "size": human_bytes(adir.size_bytes()),
                     "created": str(reg.get("created_at", "-"))[:19]})
    if not rows:
        print(f"no artifacts under {home}")
        return 0
    print(format_table(rows, ["stage", "version", "state", "rows", "size", "created"]))
    return 0


def version_dirs(home: Path, stage: str | None = None) -> list[ArtifactDir]:
    """Return every version folder under `home` (of `stage` only, if given), by stage then version.

    Dot-folders are not versions: temp files, gc trash (`.trash-`), a forced rebuild's backup (`.replaced-`).
    """
    out = []
    for stage_dir in sorted((home / ARTIFACTS_DIR).glob("*")):
        if not stage_dir.is_dir() or stage_dir.name.startswith(".") or stage not in (None, stage_dir.name):
            continue
        out += [ArtifactDir(home, stage_dir.name, v.name) for v in sorted(stage_dir.iterdir())
                if v.is_dir() and not v.name.startswith(".")]
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    from loralens.flows.pipeline import STAGES
    from loralens.tasks.stage_versions import reopen_changed

    if args.stage is not None and args.stage not in STAGES:
        raise ConfigError(f"unknown stage '{args.stage}'; stages: {', '.join(STAGES)}")
    home = Path(args.home).resolve() if args.home else load_config(args.config).home
    rows, bad_total = [], 0
    for adir in version_dirs(home, args.stage):
        manifest = adir.manifest()
        if manifest is None:
            continue  # incomplete: its shards are checked when the stage resumes it
        bad = reopen_changed(adir, full=True)  # a bad version is reopened as a run would reopen it
        bad_total += len(bad)
        rows.append({"stage": adir.stage, "version": adir.version, "files": len(manifest["files"]),
                     "bytes": human_bytes(manifest["total_bytes"]),
                     "result": "ok" if not bad else f"{len(bad)} bad file{'s' * (len(bad) > 1)}: "
                               + ", ".join(f["path"] for f in bad[:3]) + (", ..." if len(bad) > 3 else "")})
    if not rows:
        print(f"no complete {args.stage or 'artifact'} versions under {home}")
        return 0
    print(format_table(rows, ["stage", "version", "files", "bytes", "result"]))
    if bad_total:
        print(f"{bad_total} file(s) failed their sha256; their versions were reopened: the next `loralens run` "
              "redoes the bad shards (train, attribute: the whole version)")
        return 1
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from loralens.warehouse.db import connect

    home = Path(args.home).resolve() if args.home else load_config(args.config).home
    db = warehouse_path(home)
    if not db.exists():
        raise ArtifactError(f"no warehouse at {db}; run the pipeline first")
    with connect(db, read_only=True) as con:
        try:
            cur = con.execute(args.query)
            columns = [d[0] for d in cur.description] if cur.description else []
            rows = cur.fetchall() if columns else []
        except duckdb.Error as err:
            print(f"loralens: error: {err}", file=sys.stderr)  # DuckDB's own text, with its position marker
            return 2
    print(format_rows(columns, rows, args.format))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from loralens.warehouse.gc import collect_garbage, find_garbage

    home = Path(args.home).resolve() if args.home else load_config(args.config).home
    garbage = find_garbage(home, keep_latest=args.keep_latest, include_incomplete=args.include_incomplete,
                           wait_s=args.wait)
    if not garbage:
        print(f"nothing to remove under {home}")
        return 0
    rows = [{"stage": g.stage, "version": g.version, "size": human_bytes(g.bytes), "reason": g.reason}
            for g in garbage]
    print(format_table(rows, ["stage", "version", "size", "reason"]))
    total = human_bytes(sum(g.bytes for g in garbage))
    if not args.yes:
        print(f"would remove {len(garbage)} item(s), {total} (dry run; pass --yes to delete)")
        return 0
    result = collect_garbage(home, garbage, wait_s=args.wait)
    print(f"removed {len(result.removed)} item(s), {total}; {sum(result.rows.values())} warehouse rows deleted")
    return 0


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    """Return query results as an aligned table, CSV or a JSON list of objects."""
    if fmt == "json":
        return json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    return format_table([dict(zip(columns, r, strict=True)) for r in rows], columns) + f"\n({len(rows)} rows)"


def plan_config(args: argparse.Namespace):
    """Return the pipeline config of `loralens plan`: the config file (or defaults) with the given flags laid over."""
    from loralens.config import parse_config

    base = load_config(args.config).model_dump(mode="json")
    if args.home:
        base["home"] = str(Path(args.home).resolve())
    if args.model:
        base["model"]["name"] = args.model
    flags = {"form": args.form, "rank": args.rank, "alpha": args.alpha, "objective": args.objective,
             "param_dtype": args.dtype, "loss": args.loss, "base_dtype": args.base_dtype,
             "micro_batch_tokens": args.micro_batch_tokens, "loss_chunk": args.chunk, "world_size": args.world_size,
             "zero_stage": args.zero_stage}
    base["train"] |= {k: v for k, v in flags.items() if v is not None}
    if args.top_k is not None:
        base["cache"]["top_k"] = args.top_k
    if args.layers is not None:
        base["cache"]["layers"] = list(range(args.layers))
    return parse_config(base)


def cmd_plan(args: argparse.Namespace) -> int:
    from loralens.lens.lenses import LensConfig
    from loralens.lens.plan import dims_of, load_model_config, plan_memory
    from loralens.tasks.memory import predict_all

    if args.model is None and args.config is None:
        raise ConfigError("plan: give --model or --config")
    if args.layers is not None and args.layers < 1:
        raise PlanError(f"layers trained must be >= 1, got {args.layers}")
    dims = dims_of(load_model_config(args.model or load_config(args.config).model.name,
                                     Path(args.home).resolve() if args.home else default_home()))
    if args.layers is not None and args.layers > dims.n_layers:
        raise PlanError(f"layers trained must be in [1, {dims.n_layers}], got {args.layers}")
    try:
        cfg = plan_config(args)
    except ConfigError as err:
        raise PlanError(str(err)) from None
    t = cfg.train
    try:
        lens = LensConfig(form=t.form, rank=t.rank, alpha=t.alpha, dtype=t.param_dtype, objective=t.objective)
    except ValueError as err:
        raise PlanError(str(err)) from None
    n_layers = len(cfg.cache.layers) if cfg.cache.layers is not None else dims.n_layers
    top_k = cfg.target_top_k
    plan = plan_memory(dims, lens, micro_batch_tokens=t.micro_batch_tokens, n_layers_trained=n_layers,
                       top_k=top_k, loss=t.loss, chunk=t.loss_chunk, world_size=t.world_size,
                       zero_stage=t.zero_stage, base_dtype=t.base_dtype)
    print(f"model: {cfg.model.name} ({dims.n_layers} layers x {dims.n_heads} heads, d_head {dims.d_head}, "
          f"d_model {dims.d_model}, vocab {dims.vocab}), {cfg.model.dtype}")
    print(f"lens: {lens.form} rank {lens.rank} alpha {lens.alpha:g} {lens.objective} {lens.dtype}; loss {t.loss} "
          f"(cached top-{top_k}, chunk {t.loss_chunk}); {t.micro_batch_tokens} tokens/micro-batch; "
          f"{n_layers} layers trained; world size {t.world_size}, ZeRO-{t.zero_stage}")
    rows = [{"section": sec, "item": item, "value": value,
             "size": human_bytes(value) if unit == "bytes" else f"{value / 1e6:.2f} M params"}
            for sec, item, value, unit in plan.rows()]
    print(format_table(rows, ["section", "item", "value", "size"]))
    print("\npredicted peak resident memory per stage (the stages check it before they start):")
    stages = predict_all(cfg)
    print(format_table([{"stage": m.stage, "processes": m.processes, "peak": human_bytes(m.total),
                         "largest parts": ", ".join(f"{n} {human_bytes(b)}" for n, b in
                                                    sorted(m.parts, key=lambda p: -p[1])[:3])}
                        for m in stages], ["stage", "processes", "peak", "largest parts"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `loralens` command."""
    parser = argparse.ArgumentParser(prog="loralens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (each stage skipped when its version is complete)")
    run.add_argument("--config", help="YAML config file (defaults: embedded SmolLM2, bundled prompts)")
    run.add_argument("--only", help="run only this stage")
    run.add_argument("--force", action="store_true", help="redo the stage(s) even if complete")
    run.add_argument("--workers", type=int, default=1,
                     help="split caching and generation over N mapped Prefect tasks (default 1)")
    run.add_argument("--verify", action="store_true",
                     help="re-hash (sha256) a complete version's files before reusing it, not just size and mtime")
    run.add_argument("--home", help=f"project home (default $LORALENS_HOME or {default_home()})")
    run.set_defaults(fn=cmd_run)
    status = sub.add_parser("status", help="show every stage's versions, state and size")
    status.add_argument("--config")
    status.add_argument("--home")
    status.set_defaults(fn=cmd_status)
    verify = sub.add_parser("verify", help="re-hash every file of every complete version against its manifest; "
                                           "reopen bad versions so the next run redoes them (exit 1 if any)")
    verify.add_argument("stage", nargs="?", help="only this stage's versions (default: all stages)")
    verify.add_argument("--config")
    verify.add_argument("--home")
    verify.set_defaults(fn=cmd_verify)
    sql = sub.add_parser("sql", help="run a read-only SQL query on the warehouse (DuckDB) and print the result")
    sql.add_argument("query", help='e.g. "SELECT * FROM top_toxic_heads WHERE method = \'lens_contrast\'"')
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.add_argument("--config")
    sql.add_argument("--home")
    sql.set_defaults(fn=cmd_sql)
    gc = sub.add_parser("gc", help="remove artifact versions nothing kept depends on (dry run unless --yes)")
    gc.add_argument("--yes", action="store_true", help="really delete (default: only list what would go)")
    gc.add_argument("--keep-latest", type=int, default=1, help="newest complete versions kept per stage")
    gc.add_argument("--include-incomplete", action="store_true",
                    help="also remove incomplete versions that are not their stage's newest attempt")
    gc.add_argument("--wait", type=float, default=30.0, help="seconds to wait for another warehouse writer")
    gc.add_argument("--config")
    gc.add_argument("--home")
    gc.set_defaults(fn=cmd_gc)
    plan = sub.add_parser("plan", help="predict a config's sizes: lens parameters, training memory per rank, cache "
                                       "bytes per token, and every stage's peak memory")
    plan.add_argument("--config", help="pipeline config file (default: the defaults); the flags below override it")
    plan.add_argument("--model", help="config.json, model folder, embedded alias or hub id (default: the config's)")
    plan.add_argument("--form", choices=("full", "lora", "residual"))
    plan.add_argument("--rank", type=int)
    plan.add_argument("--alpha", type=float)
    plan.add_argument("--objective", choices=("joint", "per_head"))
    plan.add_argument("--dtype", choices=("float32", "bfloat16"), help="lens parameter dtype")
    plan.add_argument("--loss", choices=("exact", "subset"))
    plan.add_argument("--base-dtype", choices=("bfloat16", "float32"),
                      help="dtype of the frozen base projection in training")
    plan.add_argument("--micro-batch-tokens", type=int)
    plan.add_argument("--layers", type=int, help="number of layers trained (default all)")
    plan.add_argument("--top-k", type=int, help="target top-k cached (default: 64 for the subset loss, else 0)")
    plan.add_argument("--chunk", type=int, help="tokens per checkpointed loss chunk (train.loss_chunk)")
    plan.add_argument("--world-size", type=int)
    plan.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    plan.add_argument("--home", help="project home holding converted embedded models")
    plan.set_defaults(fn=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loralens` console command."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as err:
        print(f"loralens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
