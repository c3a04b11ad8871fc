"""The `loralens` command line: run the pipeline, inspect heads, query the warehouse, check and clean artifacts."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loralens.defaults import default_home
from loralens.warehouse.constants import ARTIFACTS_DIR, STAGES

if TYPE_CHECKING:
    from loralens.warehouse.artifacts import ArtifactDir

# Errors a user can fix; they print as one line instead of a traceback. Named by (module, class) and looked up only
# in modules already imported (a command that never imported a module cannot raise its errors), so that start-up
# imports none of them: `loralens --help` and `loralens sql` never import torch or Prefect.
USER_ERROR_CLASSES = (
    ("loralens.config", "ConfigError"), ("loralens.warehouse.corpus", "CorpusError"),
    ("loralens.lens.runtime.models", "ModelLoadError"),
    ("loralens.lens.heads.adapters", "UnsupportedArchitectureError"),
    ("loralens.warehouse.artifacts", "ArtifactError"), ("loralens.warehouse.db", "WarehouseLockedError"),
    ("loralens.tasks.stages.train", "TrainingInterrupted"), ("loralens.lens.training.plan", "PlanError"),
    ("loralens.lens.lenses.readout", "LensMismatchError"), ("loralens.lens.evaluation.scorers", "ScorerError"),
    ("loralens.lens.runtime.stage_memory", "MemoryBudgetError"), ("loralens.lens.runtime.lean", "LeanLoadError"),
    ("loralens.api", "ApiError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Return the user-error classes of the modules imported so far."""
    return tuple(getattr(sys.modules[mod], name) for mod, name in USER_ERROR_CLASSES if mod in sys.modules)


def is_user_error(err: BaseException | None) -> bool:
    """Return True when `err` is an error the user can fix (printed as one line, exit 2)."""
    return err is not None and isinstance(err, user_errors())


def _home(args: argparse.Namespace) -> Path:
    """Return the project home of a command: --home, else the config file's home, else the default."""
    if args.home:
        return Path(args.home).expanduser().resolve()
    if getattr(args, "config", None):
        from loralens.config import load_config

        return load_config(args.config).home
    return default_home()


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
    from loralens.config import ConfigError, load_config
    from loralens.warehouse.corpus import load_corpus

    cfg = load_config(args.config)  # validate before Prefect starts its server
    if args.only is not None and args.only not in STAGES:
        raise ConfigError(f"unknown stage '{args.only}'; stages: {', '.join(STAGES)}")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    load_corpus(cfg.corpus.paths, cfg.corpus.max_prompts_per_file)  # a bad prompt file: one line, no flow run
    from loralens.flows.pipeline import pipeline
    from loralens.tasks.report import stage_detail
    from loralens.warehouse.db import warehouse_path

    quiet_user_error_logs()
    overrides = {"home": str(args.home)} if args.home else None
    results = pipeline(config_path=args.config, config=overrides, only=args.only, force=args.force,
                       workers=args.workers, verify=args.verify, dask_address=args.dask_address)
    rows = [{"stage": stage, "version": res["version"], "result": "cached" if res.get("cached") else "done",
             "detail": stage_detail(stage, res), "path": res.get("path", "")} for stage, res in results.items()]
    print(format_table(rows, ["stage", "version", "result", "detail", "path"]))
    report = next((r["run_report"] for r in results.values() if "run_report" in r), None)
    if report:
        print(f"run report: {report}")
    print(f"warehouse: {warehouse_path(Path(args.home) if args.home else cfg.home)}")
    return 0


# What Prefect's engines log about a failed run: the exception with its traceback, then the final state.
_FAILURE_MARKS = ("Encountered exception", "encountered an exception", "Finished in state Failed",
                  "Task run failed with exception", "Flow run failed", "Crashed")


class _DropUserErrorLines(logging.Filter):
    """Keep Prefect's lines about a run that failed on a user error off the terminal (the CLI prints one line).

    Installed on the terminal handlers only: the flow-run log (Prefect's API handler) keeps every line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and is_user_error(record.exc_info[1]):
            return False
        if not record.name.startswith("prefect") or record.levelno < logging.INFO:
            return True
        message = record.getMessage()
        if not any(mark in message for mark in _FAILURE_MARKS):
            return True
        return not any(f"{cls.__name__}:" in message or f"{cls.__name__}(" in message for cls in user_errors())


def quiet_user_error_logs() -> None:
    """Install the filter on every terminal handler of the root and Prefect loggers (not on Prefect's API ones)."""
    from prefect.logging.handlers import APILogHandler

    for name in (None, "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, APILogHandler) and not any(
                    isinstance(f, _DropUserErrorLines) for f in handler.filters):
                handler.addFilter(_DropUserErrorLines())


def cmd_status(args: argparse.Namespace) -> int:
    from loralens.warehouse.db import list_artifacts, warehouse_path

    home = _home(args)
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
    from loralens.warehouse.artifacts import ArtifactDir

    out = []
    for stage_dir in sorted((home / ARTIFACTS_DIR).glob("*")):
        if not stage_dir.is_dir() or stage_dir.name.startswith(".") or stage not in (None, stage_dir.name):
            continue
        out += [ArtifactDir(home, stage_dir.name, v.name) for v in sorted(stage_dir.iterdir())
                if v.is_dir() and not v.name.startswith(".")]
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    from loralens.config import ConfigError
    from loralens.tasks.stage_versions import reopen_changed

    if args.stage is not None and args.stage not in STAGES:
        raise ConfigError(f"unknown stage '{args.stage}'; stages: {', '.join(STAGES)}")
    home = _home(args)
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
              "redoes the bad shards (train, attribute, select: the whole version)")
        return 1
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from loralens.warehouse.artifacts import ArtifactError
    from loralens.warehouse.db import connect, warehouse_path

    db = warehouse_path(_home(args))
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


def cmd_inspect(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    import loralens

    hf_logging.disable_progress_bar()  # the model loads in a second: no bar on the terminal
    home = loralens.open(_home(args))
    heads = loralens.parse_heads(" ".join(args.heads))
    lenses = home.lenses(args.version)
    decoding = lenses.decode(args.prompt, heads=heads, k=args.k, position=args.position)
    groups: dict[tuple, dict] = {}
    for r in decoding.table.to_pylist():
        key = (r["layer"], r["head"], r["position"], r["lens"])
        g = groups.setdefault(key, {"head": f"L{r['layer']}H{r['head']}", "layer": r["layer"], "head_index": r["head"],
                                    "position": r["position"], "input_token": r["input_token"], "lens": r["lens"],
                                    "expected_toxicity": r["expected_toxicity"], "top": []})
        g["top"].append({"token": r["token"], "prob": r["prob"]})
    order = {(layer, h): i for i, (layer, h) in enumerate(heads)}
    rows = sorted(groups.values(), key=lambda g: (order[(g["layer"], g["head_index"])], g["position"],
                                                  g["lens"] != "trained"))
    for g in rows:
        tox = g["expected_toxicity"]
        g["expected_toxicity"] = None if tox is None or tox != tox else round(tox, 4)  # NaN: no decode version
    if args.format == "json":
        print(json.dumps({"train_version": lenses.version, "prompt": args.prompt, "rows": rows}, indent=1,
                         ensure_ascii=False))
        return 0
    quote = lambda t: json.dumps(t, ensure_ascii=False)  # noqa: E731 - shows leading spaces
    table = [{"head": g["head"], "pos": g["position"], "token": quote(g["input_token"]), "lens": g["lens"],
              "exp. toxicity": "-" if g["expected_toxicity"] is None else f"{g['expected_toxicity']:.4f}",
              "top tokens (probability)": "  ".join(f"{quote(t['token'])} {t['prob']:.3f}" for t in g["top"])}
             for g in rows]
    print(f"train version {lenses.version}; prompt {quote(args.prompt)}")
    print(format_table(table, ["head", "pos", "token", "lens", "exp. toxicity", "top tokens (probability)"]))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from loralens.warehouse.gc import collect_garbage, find_garbage

    home = _home(args)
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
    from loralens.config import load_config, parse_config

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
    from loralens.config import ConfigError, load_config
    from loralens.lens.lenses.lens_set import LensConfig
    from loralens.lens.runtime.model_config import dims_of, load_model_config
    from loralens.lens.training.plan import PlanError, plan_memory
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
          f"d_model {dims.d_model}, vocab {dims.vocab}), {cfg.model.resolved_dtype()}")
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


# -- export-lenses: a home's lenses as a portable folder (Lenses.from_pretrained reads it) -------------------------
def cmd_export_lenses(args: argparse.Namespace) -> int:
    from loralens.api.pretrained import export_lenses

    out = export_lenses(args.out_dir, home=_home(args), version=args.version)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"wrote {len(files)} files to {out}: {', '.join(files)}")
    print(f"load them with: loralens.Lenses.from_pretrained({str(out)!r}, model)")
    return 0


def add_export_lenses(sub) -> None:
    """Add the `export-lenses` command to the subparsers `sub`."""
    p = sub.add_parser("export-lenses", help="write a train version's lenses to a portable folder (config.json + "
                                              "safetensors, hub-compatible) that Lenses.from_pretrained loads")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created; its lens files are replaced)")
    p.add_argument("--version", metavar="TRAIN_VERSION",
                   help="train version whose lenses to export (default: the newest complete one)")
    p.add_argument("--home", metavar="DIR", help="project home (default: $LORALENS_HOME or ./.loralens)")
    p.set_defaults(fn=cmd_export_lenses)


class UsageError(Exception):
    """A bad command line (unknown option, bad value): printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors that point at `--help` (instead of the usage block and exit)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise UsageError(f"{message} (see `{self.prog} --help`)")


HOME_HELP = "project home (default: the config's home, else $LORALENS_HOME or ./.loralens)"
CONFIG_HELP = "YAML config file; its `home` is used unless --home is given"


def _home_options(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--home", metavar="DIR", help=HOME_HELP)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `loralens` command."""
    parser = _Parser(prog="loralens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stages = ", ".join(STAGES)
    run = sub.add_parser("run", help="run the pipeline (each stage skipped when its version is complete)")
    run.add_argument("--config", metavar="FILE",
                     help="YAML config file (default: embedded SmolLM2, bundled prompts)")
    run.add_argument("--only", metavar="STAGE", help=f"run only this stage, one of: {stages}")
    run.add_argument("--force", action="store_true", help="redo the stage(s) even if complete")
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="cache shards, decode shards and generation units on a local Dask cluster of N worker "
                          "processes (default: the config's run.workers, 1 = in this process)")
    run.add_argument("--dask-address", metavar="ADDRESS",
                     help="run them on an existing Dask scheduler instead (tcp://host:8786)")
    run.add_argument("--verify", action="store_true",
                     help="re-hash (sha256) a complete version's files before reusing it, not just size and mtime")
    run.add_argument("--home", metavar="DIR", help="project home (default: the config's home, else $LORALENS_HOME "
                                                   "or ./.loralens)")
    run.set_defaults(fn=cmd_run)
    status = sub.add_parser("status", help="show every stage's versions, state and size")
    _home_options(status)
    status.set_defaults(fn=cmd_status)
    verify = sub.add_parser("verify", help="re-hash every file of every complete version against its manifest; "
                                           "reopen bad versions so the next run redoes them (exit 1 if any)")
    verify.add_argument("stage", nargs="?", metavar="STAGE", help=f"only this stage's versions, one of: {stages} "
                                                                   "(default: all)")
    _home_options(verify)
    verify.set_defaults(fn=cmd_verify)
    sql = sub.add_parser("sql", help="run a read-only SQL query on the warehouse (DuckDB) and print the result")
    sql.add_argument("query", help='e.g. "SELECT * FROM top_toxic_heads WHERE method = \'lens_contrast\'"')
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table",
                     help="output format (default: table)")
    _home_options(sql)
    sql.set_defaults(fn=cmd_sql)
    inspect = sub.add_parser("inspect", help="decode heads on a prompt: top tokens under the trained lens and the "
                                             "logit lens, from the newest complete versions in the home")
    inspect.add_argument("heads", nargs="+", metavar="HEAD", help="heads as LxHy or LAYER.HEAD (e.g. L21H3 5.0)")
    inspect.add_argument("--prompt", required=True, metavar="TEXT", help="the text to decode")
    inspect.add_argument("--k", type=int, default=10, help="top tokens per head and lens (default 10)")
    inspect.add_argument("--position", choices=("all", "last"), default="last",
                         help="decode every position or only the last one, which predicts the next token "
                              "(default: last)")
    inspect.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: "
                                                                                      "table)")
    inspect.add_argument("--version", metavar="TRAIN_VERSION",
                         help="train version whose lenses to use (default: the newest complete one)")
    _home_options(inspect)
    inspect.set_defaults(fn=cmd_inspect)
    gc = sub.add_parser("gc", help="remove artifact versions nothing kept depends on (dry run unless --yes)")
    gc.add_argument("--yes", action="store_true", help="really delete (default: only list what would go)")
    gc.add_argument("--keep-latest", type=int, default=1, metavar="N",
                    help="newest complete versions kept per stage (default 1)")
    gc.add_argument("--include-incomplete", action="store_true",
                    help="also remove incomplete versions that are not their stage's newest attempt")
    gc.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                    help="seconds to wait for another warehouse writer (default 30)")
    _home_options(gc)
    gc.set_defaults(fn=cmd_gc)
    plan = sub.add_parser("plan", help="predict a config's sizes: lens parameters, training memory per rank, cache "
                                       "bytes per token, and every stage's peak memory")
    plan.add_argument("--config", metavar="FILE",
                      help="pipeline config file (default: the defaults); the flags below override it")
    plan.add_argument("--model", metavar="MODEL",
                      help="config.json, model folder, embedded alias or hub id (default: the config's)")
    plan.add_argument("--form", choices=("full", "lora", "residual"), help="lens form (train.form)")
    plan.add_argument("--rank", type=int, help="adapter rank (train.rank)")
    plan.add_argument("--alpha", type=float, help="LoRA scale numerator, scale = alpha / rank (train.alpha)")
    plan.add_argument("--objective", choices=("joint", "per_head"), help="training objective (train.objective)")
    plan.add_argument("--dtype", choices=("float32", "bfloat16"), help="lens parameter dtype (train.param_dtype)")
    plan.add_argument("--loss", choices=("exact", "subset"), help="training loss (train.loss)")
    plan.add_argument("--base-dtype", choices=("bfloat16", "float32"),
                      help="dtype of the frozen base projection in training (train.base_dtype)")
    plan.add_argument("--micro-batch-tokens", type=int, metavar="N", help="tokens per micro-batch and rank")
    plan.add_argument("--layers", type=int, metavar="N", help="number of layers trained (default all)")
    plan.add_argument("--top-k", type=int, metavar="K",
                      help="target top-k cached (default: 64 for the subset loss, else 0)")
    plan.add_argument("--chunk", type=int, metavar="N", help="tokens per checkpointed loss chunk (train.loss_chunk)")
    plan.add_argument("--world-size", type=int, metavar="N", help="data-parallel training processes")
    plan.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    plan.add_argument("--home", metavar="DIR", help="project home holding converted embedded models")
    plan.set_defaults(fn=cmd_plan)
    add_export_lenses(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loralens` console command."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except UsageError as err:
        print(f"loralens: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"loralens: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
