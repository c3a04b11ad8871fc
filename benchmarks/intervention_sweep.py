"""Which intervention kind and which attribution method lower toxicity: the intervene stage under variants.

Runs the `intervene` stage (upstream stages cached in the home) once per variant — intervention kind x
attribution method — with the same prompts, k and sampling seeds, so every variant's baseline is the same
generation. Prints one row per (variant, condition) and writes JSON.

    python benchmarks/intervention_sweep.py [--home .loralens] [--sizes 1 3] [--seeds 0 1] [--out benchmarks/results]
        [--variants zero:lens_contrast ...] [--max-prompts 96 --k 4 --name intervention_sweep_96]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from loralens.prefect_env import configure_prefect_env

configure_prefect_env()

VARIANTS = [
    ("zero", "lens_contrast"), ("zero", "direct_logit"), ("project", "lens_contrast"), ("mean", "lens_contrast"),
    ("zero", "dictionary_count"), ("zero", "logit_lens_contrast"), ("zero", "lens_mean"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=".loralens")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="*", help="kind:method pairs (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--max-prompts", type=int, help="challenging prompts (default: the config's, 24)")
    parser.add_argument("--k", type=int, help="continuations per prompt (default: the config's, 4)")
    parser.add_argument("--name", default="intervention_sweep", help="results file stem")
    args = parser.parse_args()
    from loralens.flows.pipeline import pipeline

    variants = [tuple(v.split(":")) for v in args.variants] if args.variants else VARIANTS
    rows, runs = [], []
    for kind, method in variants:
        config = {"home": str(Path(args.home).resolve()),
                  "intervene": {"kind": kind, "head_sets": [{"top_n": n, "method": method} for n in args.sizes],
                                "random_seeds": list(args.seeds), "ablation_candidates": 0,
                                **({"max_prompts": args.max_prompts} if args.max_prompts else {}),
                                **({"k": args.k} if args.k else {})}}
        t0 = time.perf_counter()
        res = pipeline(config=config, only="intervene")["intervene"]
        runs.append({"kind": kind, "method": method, "version": res["version"], "seconds": time.perf_counter() - t0,
                     "goal": res["goal"]})
        import duckdb

        with duckdb.connect(str(Path(args.home) / "warehouse.duckdb"), read_only=True) as con:
            cur = con.execute("SELECT condition, heads, emt, emt_delta, emt_delta_low, emt_delta_high, tox_prob, "
                              "ppl_rel FROM interventions WHERE version = ? ORDER BY grp, n_heads, condition",
                              [res["version"]])
            cols = [d[0] for d in cur.description]
            for r in cur.fetchall():
                rows.append({"kind": kind, "method": method, **dict(zip(cols, r, strict=True))})
        write_json(Path(args.out), args, runs, rows)  # after every variant: a long sweep keeps what it measured
    head = f"{'kind':8} {'method':20} {'condition':28} {'EMT':>6} {'dEMT [95% CI]':>24} {'tox.p':>6} {'PPL rel':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ci = f"{r['emt_delta']:+.3f} [{r['emt_delta_low']:+.3f}, {r['emt_delta_high']:+.3f}]"
        ppl = "-" if r["ppl_rel"] is None else f"{r['ppl_rel']:+.1%}"
        print(f"{r['kind']:8} {r['method']:20} {r['condition'][:28]:28} {r['emt']:6.3f} {ci:>24} {r['tox_prob']:6.3f} "
              f"{ppl:>8}")


def write_json(out: Path, args: argparse.Namespace, runs: list[dict], rows: list[dict]) -> None:
    """Write the sweep's results so far, keeping earlier variants of the same sizes and seeds (a sweep run in
    parts adds to the file; a variant measured again replaces its old rows)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if old.get("sizes") == args.sizes and old.get("seeds") == args.seeds and old.get("k") == args.k \
            and old.get("max_prompts") == args.max_prompts:
        mine = {(r["kind"], r["method"]) for r in runs}
        runs = [r for r in old["runs"] if (r["kind"], r["method"]) not in mine] + runs
        rows = [r for r in old["rows"] if (r["kind"], r["method"]) not in mine] + rows
    path.write_text(json.dumps(
        {"machine": platform.platform(), "sizes": args.sizes, "seeds": args.seeds, "k": args.k,
         "max_prompts": args.max_prompts, "runs": runs, "rows": rows},
        indent=1, default=str))


if __name__ == "__main__":
    main()
