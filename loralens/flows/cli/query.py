"""Commands that read a home: `sql` on the warehouse and `inspect` (heads decoded on a prompt)."""

from __future__ import annotations

import argparse
import json
import sys

from loralens.flows.cli.output import format_rows, format_table, home_of


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
    """`loralens inspect HEAD...`: decode heads on a prompt under the trained and the logit lens."""
    from transformers.utils import logging as hf_logging

    import loralens

    hf_logging.disable_progress_bar()  # the model loads in a second: no bar on the terminal
    home = loralens.open(home_of(args))
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
