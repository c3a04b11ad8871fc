"""`loralens plan`: a config's predicted sizes and every stage's peak memory, without running anything."""

from __future__ import annotations

import argparse
from pathlib import Path

from loralens.defaults import default_home
from loralens.flows.cli.output import format_table, human_bytes


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
    """`loralens plan`: print a config's predicted sizes and every stage's peak memory."""
    from loralens.config import ConfigError, load_config
    from loralens.lens.lenses.lens_set import LensConfig
    from loralens.lens.memory.training_plan import PlanError, plan_memory
    from loralens.lens.runtime.model_config import dims_of, load_model_config
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
