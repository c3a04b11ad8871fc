"""Pictures for people: the per-head fidelity heatmap of a trained lens set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def fidelity_heatmap(fid: dict[str, Any], path: Path) -> Path:
    """Write a layers x heads heatmap of held-out KL (trained lens / logit lens) as a PNG; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = np.asarray(fid["head_lens"]) / np.asarray(fid["head_logit_lens"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * ratio.shape[1], 1.5 + 0.22 * ratio.shape[0]))
    # Scale to the data: after short training every ratio can sit just under 1, and a fixed 0-1 range
    # would paint them all one colour.
    im = ax.imshow(ratio, aspect="auto", cmap="viridis_r", vmin=float(ratio.min()), vmax=float(ratio.max()))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(fid["layers"])), [str(x) for x in fid["layers"]], fontsize=6)
    ax.set_xticks(range(ratio.shape[1]))
    ax.set_title(f"held-out KL, trained lens / logit lens (lower is better)\n"
                 f"{fid['tokens']:.0f} held-out tokens", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fidelity_markdown(fid: dict[str, Any], heatmap: Path | None = None) -> str:
    """Return a Markdown report of held-out lens fidelity: one row per layer, plus the heatmap's path."""
    lines = [
        f"Held-out exact KL(model || lens), nats per token, over {fid['tokens']:.0f} tokens.",
        "",
        "| layer | joint lens | logit lens | ratio | subset KL (same lens) | best head | worst head |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for i, layer in enumerate(fid["layers"]):
        head = np.asarray(fid["head_lens"][i]) / np.asarray(fid["head_logit_lens"][i])
        lines.append(
            f"| {layer} | {fid['layer_lens'][i]:.3f} | {fid['layer_logit_lens'][i]:.3f} | "
            f"{fid['layer_lens'][i] / fid['layer_logit_lens'][i]:.3f} | {fid['layer_subset_kl'][i]:.3f} | "
            f"{int(head.argmin())} ({head.min():.3f}) | {int(head.argmax())} ({head.max():.3f}) |"
        )
    if heatmap is not None:
        lines += ["", f"Heatmap (layers x heads, KL ratio): `{heatmap}`"]
    return "\n".join(lines)
