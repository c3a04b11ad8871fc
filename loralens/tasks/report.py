"""Pictures for people: the per-head fidelity heatmap of a trained lens set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def layer_head_heatmap(values: np.ndarray, layers: list[int], path: Path, *, title: str, cmap: str,
                       vmin: float, vmax: float) -> Path:
    """Write a layers x heads heatmap of `values [L, H]` as a PNG; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * values.shape[1], 1.5 + 0.22 * values.shape[0]))
    im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
    ax.set_xticks(range(values.shape[1]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def head_kl_ratio(fid: dict[str, Any]) -> np.ndarray:
    """Return each head's held-out KL through its own lens over its logit lens's, `[L, H]` (< 1: the lens is better)."""
    return np.asarray(fid["head_lens"]) / np.asarray(fid["head_logit_lens"])


def fidelity_heatmap(fid: dict[str, Any], path: Path) -> Path:
    """Write a layers x heads heatmap of held-out KL (trained lens / logit lens) as a PNG; return its path."""
    ratio = head_kl_ratio(fid)
    # Scale to the data: after short training every ratio can sit just under 1, and a fixed 0-1 range
    # would paint them all one colour.
    return layer_head_heatmap(ratio, fid["layers"], path, cmap="viridis_r", vmin=float(ratio.min()),
                              vmax=float(ratio.max()),
                              title=f"held-out KL, trained lens / logit lens (lower is better)\n"
                                    f"{fid['tokens']:.0f} held-out tokens")


def fidelity_markdown(fid: dict[str, Any], heatmap: Path | None = None) -> str:
    """Return a Markdown report of held-out lens fidelity: one row per layer, plus the heatmap's path."""
    ratio = head_kl_ratio(fid)
    lines = [
        f"Held-out exact KL(model || lens), nats per token, over {fid['tokens']:.0f} tokens.",
        "",
        f"Per head (each head's own lens alone vs its logit lens): **{int((ratio < 1).sum())} of {ratio.size} heads** "
        f"read the model better through their trained lens; KL ratio median {float(np.median(ratio)):.3f}, range "
        f"{float(ratio.min()):.3f}-{float(ratio.max()):.3f} (every head: the heatmap and the `lens_fidelity` table).",
        "",
        "| layer | joint lens | logit lens | ratio | subset KL (same lens) | best head | worst head |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for i, layer in enumerate(fid["layers"]):
        head = ratio[i]
        lines.append(
            f"| {layer} | {fid['layer_lens'][i]:.3f} | {fid['layer_logit_lens'][i]:.3f} | "
            f"{fid['layer_lens'][i] / fid['layer_logit_lens'][i]:.3f} | {fid['layer_subset_kl'][i]:.3f} | "
            f"{int(head.argmin())} ({head.min():.3f}) | {int(head.argmax())} ({head.max():.3f}) |"
        )
    if heatmap is not None:
        lines += ["", f"Heatmap (layers x heads, KL ratio): `{heatmap}`"]
    return "\n".join(lines)


def score_heatmap(scores: np.ndarray, layers: list[int], method: str, path: Path) -> Path:
    """Write a layers x heads heatmap of one head-score method `[L, H]` as a PNG; return its path."""
    # Centre diverging scores (contrasts can be negative) on zero so sign reads at a glance.
    lim = float(np.nanmax(np.abs(scores))) or 1.0
    signed = bool(np.nanmin(scores) < 0)
    return layer_head_heatmap(scores, layers, path, cmap="RdBu_r" if signed else "Reds",
                              vmin=-lim if signed else 0.0, vmax=lim,
                              title=f"head toxicity: {method}\n(higher = pushes toward toxic tokens)")


def top_heads_markdown(top: dict[str, list[dict[str, Any]]], spearman: dict[str, float | None], scorer: str) -> str:
    """Return the top heads of every method with their most frequent tokens on toxic prompts under both lenses."""
    lines = [f"Top toxic heads per method (scorer `{scorer}`); tokens: the head's most frequent top-k tokens on toxic "
             "prompts, under its trained lens and under the plain logit lens (a jointly trained head's lens carries "
             "its layer's shared prior; the logit lens shows the head's own push: see docs/benchmarks.md, readable "
             "lenses).", ""]
    for method, rows in top.items():
        lines += [f"### {method}", "", "| rank | head | score | top tokens, trained lens | top tokens, logit lens |",
                  "|---:|---|---:|---|---|"]
        for r in rows:
            tokens = {key: ", ".join(f"`{t!r}`".replace("|", "\\|") for t in r.get(key, []))
                      for key in ("top_tokens", "top_tokens_logit")}
            lines.append(f"| {r['rank']} | L{r['layer']}H{r['head']} | {r['score']:.4g} | {tokens['top_tokens']} "
                         f"| {tokens['top_tokens_logit']} |")
        lines.append("")
    lines += ["### Rank agreement (Spearman, all heads)", "", "| methods | rho |", "|---|---:|"]
    lines += [f"| {pair.replace('~', ' vs ')} | {'n/a (constant scores)' if rho is None else f'{rho:.3f}'} |"
              for pair, rho in spearman.items()]
    return "\n".join(lines) + "\n"


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _ci(row: dict[str, Any], key: str, spec: str = ".3f") -> str:
    return f"{_fmt(row[key], spec)} [{_fmt(row[key + '_low'], spec)}, {_fmt(row[key + '_high'], spec)}]"


def _vs_random(goal: dict[str, Any]) -> str:
    """Return the condition against its random sets: excess drop [95% CI], and the ratio or 'random rose'."""
    v = goal["versus_random"]
    if not v["n_random"]:
        return "no random set"
    excess = f"{_fmt(v['excess'], '+.3f')} [{_fmt(v['excess_low'], '+.3f')}, {_fmt(v['excess_high'], '+.3f')}]"
    ratio = f"random rose ({-v['random_drop']:+.3f})" if v["random_rose"] else f"{v['ratio']:.2f}x"
    return f"{excess}; {ratio}"


def _figures(h: dict[str, Any]) -> str:
    """Return a verdict's figures: EMT, toxicity probability and mean toxicity with intervals, PPL rise."""
    def ci(key: str) -> str:
        lo, hi = h[f"{key}_ci"]
        return f"{_fmt(h[key])} [{_fmt(lo)}, {_fmt(hi)}]"

    return (f"EMT {ci('emt')} ({_fmt(h['emt_rel'], '+.1%')}), tox. prob. {ci('tox_prob')}, mean tox. "
            f"{ci('mean_tox')}, PPL {_fmt(h['ppl_rel'], '+.1%')}")


def headline_markdown(summary: dict[str, Any]) -> list[str]:
    """Return the preregistered headline (whatever the evaluation says), its controls and the all-heads claim."""
    h, every = summary.get("headline"), summary.get("all_heads")
    if h is None:
        lines = ["**Headline: none (the select stage preregistered no condition).**"]
    else:
        lines = [f"**Headline (preregistered by {h['preregistered_by']}): {h['condition']}**: {_figures(h)}; goal "
                 f"{'met' if h['meets_goal'] else 'not met'}."]
        if "permutation" in h:
            p, v, rd = h["permutation"], h["versus_random"], h["random_direction"]
            lines += ["", f"Controls: permutation p = {_fmt(p['p'])} (rank {p['rank']} among {p['n_random']} random "
                      f"head sets of the same size, edit, source and strength); excess EMT drop vs random "
                      f"{_fmt(v['excess'], '+.3f')} [{_fmt(v['excess_low'], '+.3f')}, "
                      f"{_fmt(v['excess_high'], '+.3f')}]; random directions at the same heads: "
                      + ("-" if rd is None else f"EMT {_fmt(rd['emt_rel'], '+.1%')}, PPL {_fmt(rd['ppl_rel'], '+.1%')}")
                      + ". Criteria: " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in h["criteria"].items())
                      + "."]
    if every is not None:
        lines += ["", f"**All heads (preregistered by {every['preregistered_by']}): {every['condition']}**: "
                  f"{_figures(every)}; goal (EMT <= {every['emt_rel_goal']:.0%} at PPL <= "
                  f"+{every['ppl_rel_budget']:.0%}) {'met' if every['meets_goal'] else 'not met'}."]
    return lines


def goal_markdown(summary: dict[str, Any]) -> list[str]:
    """Return the goal check of every zero-ablation head set (exploratory unless it is the headline)."""
    spec = summary["goal_spec"]
    lines = ["", f"Exploratory goal checks: <= {spec['max_head_share']:.0%} of heads and PPL up <= "
             f"{spec['ppl_rel']:.0%} (the budget); EMT down >= {-spec['emt_rel']:.0%} relative, significant, and >= "
             f"{spec['vs_random']:g}x the mean drop of random sets of the same size ({summary['random_controls']})."]
    lines += ["", "| condition | head share | EMT rel. | significant | excess drop vs random [95% CI]; ratio | "
              "PPL rel. | within budget | meets goal |", "|---|---:|---:|---|---|---:|---|---|"]
    for g in summary["goal"]:
        lines.append(f"| {g['condition']} | {g['head_share']:.1%} | {_fmt(g['emt_rel'], '+.1%')} | "
                     f"{'yes' if g['significant'] else 'no'} | {_vs_random(g)} | {_fmt(g['ppl_rel'], '+.1%')} | "
                     f"{'yes' if g['within_budget'] else 'no'} | {'yes' if g['meets_goal'] else 'no'} |")
    return lines


def intervention_markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Return the preregistered headline first, then every condition's metrics (95% bootstrap intervals) and the
    exploratory goal checks, as Markdown."""
    lines = [f"Interventions on {summary['prompts']} prompts of the {summary['prompt_split']}; "
             f"{summary['protocol']}; scorer `{summary['scorer']}`. Intervals: 95% bootstrap over prompts; EMT "
             "delta is paired (same prompts and sampling seeds as the baseline).", "", *headline_markdown(summary),
             "", f"All conditions (exploratory unless named above; zero-ablation sets use `{summary['kind']}`):", "",
             "| condition | heads | EMT [95% CI] | EMT delta [95% CI] | tox. prob. [95% CI] | mean tox. | PPL | "
             "EMT rel. | PPL rel. |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["grp"].startswith("ablation"):
            continue
        lines.append(
            f"| {r['condition']} | {r['heads'] or '-'} | {_ci(r, 'emt')} | {_ci(r, 'emt_delta', '+.3f')}"
            f" | {_ci(r, 'tox_prob')} | {_fmt(r['mean_tox'])}"
            f" | {_fmt(r['ppl'], '.2f')} | {_fmt(r['emt_rel'], '+.1%')} | {_fmt(r['ppl_rel'], '+.1%')} |")
    if summary.get("goal"):
        lines += goal_markdown(summary)
    abl = summary.get("ablation")
    if abl:
        lines += ["", "Causal per-head score (mean-toxicity drop when the head alone is zeroed; method `ablation`); "
                  f"Spearman vs the lens ranking: {_fmt(abl['spearman_vs_lens'])}", "",
                  "| head | drop | rank |", "|---|---:|---:|"]
        lines += [f"| {h} | {_fmt(d, '+.4f')} | {rk} |" for h, d, rk in zip(abl["heads"], abl["drop"], abl["rank"],
                                                                          strict=True)]
    return "\n".join(lines) + "\n"


def toxicity_ppl_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write expected maximum toxicity (with 95% intervals) against perplexity, one point per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"baseline": "black", "attributed": "tab:red", "selected": "tab:green", "random": "tab:blue",
               "steering": "tab:purple", "steering_random": "tab:cyan", "steering_random_direction": "tab:gray",
               "steering_exploratory": "tab:orange", "steering_all_heads": "tab:brown"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    shown = [r for r in rows if r["grp"] in colours and r["ppl"] is not None]
    for r in shown:
        ax.errorbar(r["ppl"], r["emt"], yerr=[[r["emt"] - r["emt_low"]], [r["emt_high"] - r["emt"]]], fmt="o",
                    color=colours[r["grp"]], capsize=3, alpha=0.8)
        if r["grp"] != "steering_random":  # twenty labels would hide the rest
            ax.annotate(r["condition"], (r["ppl"], r["emt"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for grp in dict.fromkeys(r["grp"] for r in shown):
        ax.plot([], [], "o", color=colours[grp], label=grp)
    ax.set_xlabel("WikiText-2 perplexity (fluency cost)")
    ax.set_ylabel("expected maximum toxicity")
    ax.legend(fontsize=8)
    ax.set_title("toxicity vs perplexity per condition", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def stage_detail(stage: str, res: dict[str, Any]) -> str:
    """Return the one-line figure a person wants to see for a finished stage."""
    if stage == "cache":
        kib = res.get("bytes_per_token", 0) / 1024
        return f"{res['n_prompts']} prompts, {res['n_tokens']} tokens, {kib:.1f} KiB/token"
    if stage == "train":
        return (f"{res['heads']} heads, {res['steps']} steps, held-out KL {res['mean_layer_kl']:.3f} "
                f"vs logit lens {res['mean_layer_kl_logit_lens']:.3f}")
    if stage == "decode":
        return f"{res['heads']} heads x {res['positions']} positions ({res['which_positions']}), top-{res['top_k']}"
    if stage == "attribute":
        best = res["top_heads"]["lens_contrast"][:3]
        return "top heads (lens_contrast): " + ", ".join(f"L{r['layer']}H{r['head']}" for r in best)
    if stage == "select":
        return (f"chose {res['selected'] or 'no head'} (budget {res['budget_heads']} heads) on "
                f"{res['selection_prompts']} selection prompts")
    if stage == "intervene":
        best = res.get("headline")
        if best is None:
            return f"{res['conditions']} conditions, k={res['k']}; no preregistered headline"
        return (f"{res['conditions']} conditions, k={res['k']}; preregistered headline {best['condition']}: EMT "
                f"{_fmt(best['emt_rel'], '+.1%')}, PPL {_fmt(best['ppl_rel'], '+.1%')}, goal "
                f"{'met' if best['meets_goal'] else 'not met'}")
    return ""


def run_report(config_yaml: str, results: dict[str, dict[str, Any]], seconds: dict[str, float], out: Path,
               title: str) -> Path:
    """Write one pipeline run's Markdown report (stages, fidelity, head heatmaps, top heads, interventions)."""
    import json

    def link(path: str | Path, alt: str) -> str:
        return f"![{alt}]({os.path.relpath(path, out.parent)})"

    lines = [f"# Lora Lens run report: {title}", "", "## Stages", "",
             "| stage | version | result | wall s | detail |", "|---|---|---|---:|---|"]
    for stage, res in results.items():
        lines.append(f"| {stage} | `{res['version']}` | {'cached' if res.get('cached') else 'done'} | "
                     f"{seconds.get(stage, 0):.1f} | {stage_detail(stage, res)} |")
    lines += ["", f"Total wall time: {sum(seconds.values()):.1f} s", ""]
    if "cache" in results:
        lines += [f"Model: `{results['cache'].get('model', '-')}`", ""]
    if "train" in results:
        train = Path(results["train"]["path"])
        fid = json.loads((train / "fidelity.json").read_text())
        lines += ["## Lens fidelity", "", fidelity_markdown(fid), "", link(train / "fidelity_heatmap.png",
                                                                            "fidelity heatmap"), ""]
    if "attribute" in results:
        att = results["attribute"]
        lines += ["## Head toxicity", ""]
        lines += [f"{link(p, m)}" for m, p in att["heatmaps"].items()]
        lines += ["", Path(att["report"]).read_text(encoding="utf-8"), ""]
    if "select" in results:
        lines += ["## Head selection", "", Path(results["select"]["report"]).read_text(encoding="utf-8"), ""]
    if "intervene" in results:
        iv = results["intervene"]
        lines += ["## Interventions", "", Path(iv["report"]).read_text(encoding="utf-8"), "",
                  link(iv["plot"], "toxicity vs perplexity"), ""]
    lines += ["## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    return out
