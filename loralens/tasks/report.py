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
