"""`loralens run`: validate the config and prompts here, then run the pipeline flow and print each stage's result."""

from __future__ import annotations

import argparse
from pathlib import Path

from loralens.flows.cli.errors import quiet_user_error_logs
from loralens.flows.cli.output import format_table
from loralens.warehouse.constants import STAGES


def cmd_run(args: argparse.Namespace) -> int:
    """`loralens run`: check the run (`tasks.preflight`), then run the pipeline (or one stage) and print each
    stage's version and result."""
    from loralens.config import ConfigError, load_config
    from loralens.warehouse.corpus import load_corpus

    cfg = load_config(args.config)  # validate before anything heavy is imported
    if args.only is not None and args.only not in STAGES:
        raise ConfigError(f"unknown stage '{args.only}'; stages: {', '.join(STAGES)}")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    load_corpus(cfg.corpus.paths, cfg.corpus.max_prompts_per_file)  # a bad prompt file: one line, before torch
    from loralens.flows.common import local_workers, pin_dtype, resolve_config, run_workers
    from loralens.tasks.preflight import preflight

    overrides = {"home": str(args.home)} if args.home else None
    cfg = resolve_config(args.config, overrides)  # the config the flow will resolve
    workers, dask_address = run_workers(cfg, args.workers, args.dask_address)
    # Every error the config and this machine reveal, before Prefect starts a server (the stages check again).
    preflight(cfg if dask_address else pin_dtype(cfg), args.only, force=args.force,
              workers=local_workers(workers, dask_address))
    from loralens.flows.pipeline import pipeline
    from loralens.tasks.report import stage_detail
    from loralens.warehouse.db import warehouse_path

    quiet_user_error_logs()
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
