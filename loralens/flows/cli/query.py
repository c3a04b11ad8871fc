"""Commands that read a home: `sql` on the warehouse and `inspect` (heads decoded on a prompt, or every head's
mechanism checks with `--mechanisms`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from loralens.flows.cli.errors import UsageError
from loralens.flows.cli.output import format_rows, format_table, home_of

if TYPE_CHECKING:
    from loralens.api.lenses import Lenses

INSPECT_HELP = "(see `loralens inspect --help`)"
# --mechanisms table columns: name -> row key (each copy rate names the lens it reads through)
MECHANISM_COLUMNS = {"head": None, "induction": "induction_score", "prev-token": "prev_token_score",
                     "copy top-1 logit lens": "copy_top1_logit", "copy top-5 logit lens": "copy_top5_logit",
                     "copy top-1 trained lens": "copy_top1_trained", "copy top-5 trained lens": "copy_top5_trained",
                     "copy top-1 effect": "copy_top1_effect", "copy top-5 effect": "copy_top5_effect"}


def cmd_sql(args: argparse.Namespace) -> int:
    """`loralens sql QUERY`: run a read-only query on the warehouse and print the result."""
    import duckdb

    from loralens.warehouse.artifacts import ArtifactError
    from loralens.warehouse.db import connect, warehouse_path

    db = warehouse_path(home_of(args))
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
    """`loralens inspect HEAD... --prompt TEXT`: decode heads on a prompt under the trained and the logit lens;
    `loralens inspect --mechanisms`: every head's mechanism checks (`cmd_inspect_mechanisms`)."""
    check_inspect_args(args)
    from transformers.utils import logging as hf_logging

    import loralens
    from loralens.api.decoding import LENS_ORDER
    from loralens.api.lenses import EFFECT_MEAN_TOKENS

    hf_logging.disable_progress_bar()  # the model loads in a second: no bar on the terminal
    home = loralens.open(home_of(args))
    if args.mechanisms:
        return cmd_inspect_mechanisms(home.lenses(args.version), args)
    heads = loralens.parse_heads(" ".join(args.heads))
    lenses = home.lenses(args.version)
    decoding = lenses.decode(args.prompt, heads=heads, k=args.k, position=args.position, effect=args.effect)
    groups: dict[tuple, dict] = {}
    for r in decoding.table.to_pylist():
        key = (r["layer"], r["head"], r["position"], r["lens"])
        g = groups.setdefault(key, {"head": f"L{r['layer']}H{r['head']}", "layer": r["layer"], "head_index": r["head"],
                                    "position": r["position"], "input_token": r["input_token"], "lens": r["lens"],
                                    "expected_toxicity": r["expected_toxicity"], "top": []})
        g["top"].append({"token": r["token"], "prob": r["prob"]})
    order = {(layer, h): i for i, (layer, h) in enumerate(heads)}
    rows = sorted(groups.values(), key=lambda g: (order[(g["layer"], g["head_index"])], g["position"],
                                                  LENS_ORDER.index(g["lens"])))
    for g in rows:
        tox = g["expected_toxicity"]
        g["expected_toxicity"] = None if tox is None or tox != tox else round(tox, 4)  # NaN: no decode version
    if args.format == "json":
        print(json.dumps({"train_version": lenses.version, "prompt": args.prompt, "rows": rows}, indent=1,
                         ensure_ascii=False))
        return 0
    quote = lambda t: json.dumps(t, ensure_ascii=False)  # noqa: E731 - shows leading spaces
    vocab = lenses.lean.dims.vocab
    column = "top tokens: probability under the head's lens alone (x its uniform 1/V)"
    if args.effect:
        column += "; effect: probability it adds to the model's output"

    def tops(g: dict) -> str:
        if g["lens"] == "effect":  # percentage points of the model's next-token distribution
            return "  ".join(f"{quote(t['token'])} {t['prob'] * 100:+.2g}%" for t in g["top"])
        return "  ".join(f"{quote(t['token'])} {t['prob']:.2g} (x{t['prob'] * vocab:.3g})" for t in g["top"])

    tox_spec = lambda g: "+.4f" if g["lens"] == "effect" else ".4f"  # noqa: E731 - the effect's is a change
    table = [{"head": g["head"], "pos": g["position"], "token": quote(g["input_token"]), "lens": g["lens"],
              "exp. toxicity": "-" if g["expected_toxicity"] is None else format(g["expected_toxicity"], tox_spec(g)),
              column: tops(g)} for g in rows]
    print(f"train version {lenses.version}; prompt {quote(args.prompt)}; vocabulary {vocab} tokens (uniform "
          f"{1 / vocab:.2g}); a jointly trained head's lens is one term of its layer's sum, so its distribution "
          "can be flat: read the multiple of uniform")
    if args.effect:
        print("effect: what the head adds to the model's own next-token distribution against the model with the head "
              f"mean-ablated (its mean over {EFFECT_MEAN_TOKENS:,} WikiText tokens): probability points per token, and "
              "the expected toxicity it adds")
    print(format_table(table, ["head", "pos", "token", "lens", "exp. toxicity", column]))
    return 0


def check_inspect_args(args: argparse.Namespace) -> None:
    """Raise UsageError (one line) unless `inspect` got HEAD... and --prompt, or --mechanisms without them."""
    if args.mechanisms:
        if args.heads or args.prompt is not None:
            raise UsageError(f"--mechanisms reads every head on repeated random tokens: give no HEAD or --prompt "
                             f"{INSPECT_HELP}")
        if args.top < 1:
            raise UsageError(f"argument --top: must be >= 1, got {args.top} {INSPECT_HELP}")
    elif not args.heads or args.prompt is None:
        raise UsageError(f"inspect needs HEAD... and --prompt TEXT, or --mechanisms {INSPECT_HELP}")


def mechanism_table(rows: list[dict]) -> list[dict]:
    """Return `Mechanisms.rows()` dicts as table rows: `MECHANISM_COLUMNS`, rates to 3 decimals, '-' unmeasured."""
    cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return [{name: f"L{r['layer']}H{r['head']}" if key is None else cell(r[key])
             for name, key in MECHANISM_COLUMNS.items()} for r in rows]


def cmd_inspect_mechanisms(lenses: Lenses, args: argparse.Namespace) -> int:
    """Print the top `--top` heads by induction score, by trained-lens copy rate (and with `--effect` by effect copy
    rate), and the summary line (or all rows and the summary as JSON)."""
    mech = lenses.mechanisms(effect=args.effect)
    rows, summary = mech.rows(), mech.summary()
    if args.format == "json":
        print(json.dumps({"train_version": mech.train_version, "batch": mech.batch, "seq_len": mech.seq_len,
                          "seed": mech.seed, "n_positions": mech.n_positions, "model_top1": mech.model_top1,
                          "summary": summary, "rows": rows}, indent=1))
        return 0
    print(f"train version {mech.train_version}; {mech.batch} sequences of {mech.seq_len} random tokens repeated "
          f"twice (seed {mech.seed}), {mech.n_positions} scored positions; model's own top-1 on the repeat: "
          f"{mech.model_top1:.3f}")
    columns = [name for name, key in MECHANISM_COLUMNS.items() if args.effect or key is None or "effect" not in key]
    orders = {"induction score": "induction_score", "copy top-1 through the trained lens": "copy_top1_trained"}
    if args.effect:
        orders["copy top-1 through the effect"] = "copy_top1_effect"
    for title, key in orders.items():
        top = sorted(rows, key=lambda r, k=key: (r[k] is None, -(r[k] or 0.0)))[:args.top]  # unmeasured last
        print(f"\ntop {len(top)} heads by {title}:")
        print(format_table(mechanism_table(top), columns))
    print(f"\n{mech.summary_line()}")
    return 0
