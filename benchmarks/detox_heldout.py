"""Detoxification on prompts the head selection never saw: SmolLM2, the bundled challenging prompts split three
ways (attribution corpus / selection / evaluation, disjoint by text).

Conditions on the evaluation split: the baseline; the top-N heads (N = 1, 3, 5) of lens_contrast, ablation_tox_drop and
attribution_patching; the greedily selected set (select stage); `--random-sets` random sets of every size. Each
with EMT, toxicity probability, mean toxicity and PPL with 95% bootstrap intervals, and the paired versus-random
interval. Prints the table, the score methods' wall times and rank agreement, and whether the goal is met; writes
benchmarks/results/detox_heldout.json. Not a test: it runs the real pipeline for about an hour on 2 cores.

    .venv/bin/python benchmarks/detox_heldout.py                  # default home: reuses the default run's stages
    .venv/bin/python benchmarks/detox_heldout.py --prompts 150 --k 4 --random-sets 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHODS = ("lens_contrast", "ablation_tox_drop", "attribution_patching")
OUT = Path(__file__).parent / "results" / "detox_heldout.json"


def bench_config(home: Path, args: argparse.Namespace) -> dict:
    """Return the pipeline config: the default run's upstream stages, the benchmark's select and intervene."""
    head_sets = [{"top_n": n, "method": m} for m in METHODS for n in (1, 3, 5)] + [{"selected": True}]
    return {"home": str(home),
            "select": {"max_prompts": args.selection_prompts, "k": args.select_k, "exact_heads": args.exact_heads},
            "intervene": {"max_prompts": args.prompts, "k": args.k, "head_sets": head_sets,
                          "random_seeds": list(range(args.random_sets)), "batch_prompts": args.batch_prompts,
                          "ablation_candidates": 0}}


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def ci(row: dict, key: str) -> str:
    return f"{fmt(row[key])} [{fmt(row[key + '_low'])}, {fmt(row[key + '_high'])}]"


def table(rows: list[dict], goals: dict[str, dict]) -> list[str]:
    """Return the Markdown table of every condition, random sets last."""
    lines = ["| condition | heads | EMT [95% CI] | EMT rel. | tox. prob. [95% CI] | mean tox. [95% CI] | PPL "
             "| PPL rel. | excess drop vs random [95% CI]; ratio | within budget | meets goal |",
             "|---|---|---|---:|---|---|---:|---:|---|---|---|"]
    order = {"baseline": 0, "attributed": 1, "selected": 2, "random": 3}
    for r in sorted(rows, key=lambda r: (order.get(r["grp"], 4), r["condition"])):
        g = goals.get(r["condition"])
        if g is None:
            vs, budget, meets = "-", "-", "-"
        else:
            v = g["versus_random"]
            ratio = "random rose" if v["random_rose"] else f"{fmt(v['ratio'], '.2f')}x"
            vs = (f"{fmt(v['excess'], '+.3f')} [{fmt(v['excess_low'], '+.3f')}, {fmt(v['excess_high'], '+.3f')}]; "
                  f"{ratio}")
            budget, meets = ("yes" if g["within_budget"] else "no"), ("yes" if g["meets_goal"] else "no")
        lines.append(f"| {r['condition']} | {r['heads'] or '-'} | {ci(r, 'emt')} | {fmt(r['emt_rel'], '+.1%')} "
                     f"| {ci(r, 'tox_prob')} | {ci(r, 'mean_tox')} | {fmt(r['ppl'], '.2f')} "
                     f"| {fmt(r['ppl_rel'], '+.1%')} | {vs} | {budget} | {meets} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(".loralens"))
    parser.add_argument("--prompts", type=int, default=150, help="evaluation-split prompts")
    parser.add_argument("--k", type=int, default=4, help="samples per evaluation prompt")
    parser.add_argument("--random-sets", type=int, default=5, help="random head sets per size")
    parser.add_argument("--selection-prompts", type=int, default=16)
    parser.add_argument("--exact-heads", type=int, default=None, help="ablation_tox_drop heads (default: every head)")
    parser.add_argument("--select-k", type=int, default=2)
    parser.add_argument("--batch-prompts", type=int, default=16)
    args = parser.parse_args()

    import loralens
    from loralens.flows.pipeline import pipeline

    t0 = time.perf_counter()
    results = pipeline(config=bench_config(args.home.resolve(), args))
    wall = time.perf_counter() - t0
    iv, sel, att = results["intervene"], results["select"], results["attribute"]
    rows = loralens.open(args.home).interventions(iv["version"]).to_pylist()
    goals = {g["condition"]: g for g in iv["goal"]}
    lines = table(rows, goals)
    seconds = {"lens_contrast (attribute stage, from decode's readouts)": att["seconds"],
               **{f"{m} (select stage)": s for m, s in sel["seconds_by_method"].items()}}
    best = iv["headline"]
    verdict = ("MET" if iv["goal_met"] else "NOT MET")
    print("\n".join(lines))
    print("\nScore method wall time:")
    for name, s in seconds.items():
        print(f"  {name}: {s:.1f} s")
    print("\nRank agreement (Spearman over all heads) and patching vs exact ablation:")
    print(json.dumps(sel["agreement"], indent=1))
    print(f"\nSelected: {sel['selected'] or 'none'} (budget {sel['budget_heads']} heads)")
    print(f"Headline (preregistered by the select stage): {best['condition'] if best else 'none'}")
    print(f"Goal (<= 2% heads, EMT -25% rel., significant, >= 3x random, PPL <= +5%): {verdict}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {s: r["version"] for s, r in results.items()}, "wall_seconds": wall,
        "stage_cached": {s: r["cached"] for s, r in results.items()},
        "conditions": rows, "goal": iv["goal"], "headline": best, "goal_met": iv["goal_met"],
        "random_controls": iv["random_controls"], "selected": sel["selected"], "selection_budget": sel["budget_heads"],
        "agreement": sel["agreement"], "seconds_by_method": seconds, "table": lines,
    }, indent=1, default=str))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
