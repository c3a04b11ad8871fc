"""The `loralens` argument parser: every command, its options and help, and the function that runs it.

A new command: a `cmd_<name>(args) -> int` in the module of its group (run.py, artifacts.py, query.py, plan.py; a
new group gets its own module, like lenses.py for `export-lenses`) and one `sub.add_parser` block in `build_parser`.
Command modules import nothing heavy at module level: `--help` must not import torch or Prefect.
"""

from __future__ import annotations

import argparse

from loralens.flows.cli.artifacts import cmd_gc, cmd_rebuild, cmd_status, cmd_verify
from loralens.flows.cli.errors import UsageError
from loralens.flows.cli.lenses import cmd_export_lenses
from loralens.flows.cli.plan import cmd_plan
from loralens.flows.cli.query import cmd_inspect, cmd_sql
from loralens.flows.cli.run import cmd_run
from loralens.warehouse.constants import STAGES

DESCRIPTION = ("The `loralens` command line: run the pipeline, inspect heads, query the warehouse, check and clean "
               "artifacts.")


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
    parser = _Parser(prog="loralens", description=DESCRIPTION)
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
                                             "logit lens, from the newest complete versions in the home; or, with "
                                             "--mechanisms, every head's induction score and copy rates")
    inspect.add_argument("heads", nargs="*", metavar="HEAD",
                         help="heads as LxHy or LAYER.HEAD (e.g. L21H3 5.0); required without --mechanisms")
    inspect.add_argument("--prompt", metavar="TEXT", help="the text to decode; required without --mechanisms")
    inspect.add_argument("--k", type=int, default=10, help="top tokens per head and lens (default 10)")
    inspect.add_argument("--position", choices=("all", "last"), default="last",
                         help="decode every position or only the last one, which predicts the next token "
                              "(default: last)")
    inspect.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: "
                                                                                      "table)")
    inspect.add_argument("--version", metavar="TRAIN_VERSION",
                         help="train version whose lenses to use (default: the newest complete one)")
    inspect.add_argument("--mechanisms", action="store_true",
                         help="instead of decoding a prompt: every head's induction and previous-token score on "
                              "repeated random tokens and its copy rates through the logit and the trained lens "
                              "(the top heads and how many induction heads the trained lens reads as well)")
    inspect.add_argument("--effect", action="store_true",
                         help="also read each head from what it adds to the model's own output, against the model "
                              "with the head mean-ablated (one more forward pass per head): the tokens it adds the "
                              "most probability to; with --mechanisms, its copy rate by log-prob lift")
    inspect.add_argument("--top", type=int, default=10, metavar="N",
                         help="with --mechanisms: heads shown per table (default 10)")
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
    rebuild = sub.add_parser("rebuild", help="recreate the warehouse (DuckDB) from the manifests and files of every "
                                             "complete version; rows of incomplete versions are not kept")
    _home_options(rebuild)
    rebuild.set_defaults(fn=cmd_rebuild)
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
    exp = sub.add_parser("export-lenses", help="write a train version's lenses to a portable folder (config.json + "
                                               "safetensors, hub-compatible) that Lenses.from_pretrained loads")
    exp.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created; its lens files are replaced)")
    exp.add_argument("--version", metavar="TRAIN_VERSION",
                     help="train version whose lenses to export (default: the newest complete one)")
    _home_options(exp, config=False)
    exp.set_defaults(fn=cmd_export_lenses)
    # New commands go here, one block each, their cmd_ function in the module of their group.
    return parser
