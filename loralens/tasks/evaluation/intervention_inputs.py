"""What the `mean` and `project` interventions need besides the heads: mean z per head, the toxic direction."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loralens.lens.heads.edits import text_head_means
from loralens.lens.heads.head_scores import toxic_direction
from loralens.lens.heads.head_sets import Head
from loralens.lens.runtime.adapters import folded_unembedding
from loralens.lens.runtime.models import LoadedModel
from loralens.tasks.stage_versions import StageVersion
from loralens.warehouse.artifacts import ArtifactDir, atomic_write_with
from loralens.warehouse.constants import HEAD_MEANS_FILE
from loralens.warehouse.decodings import read_token_toxicity


def head_means(loaded: LoadedModel, layers: list[int], ver: StageVersion, text: str, mean_tokens: int,
               window: int = 128) -> dict[Head, torch.Tensor]:
    """Return each head's mean z `[d_head]` over the first `mean_tokens` tokens of `text` (computed once per
    version, saved in its artifact folder)."""
    path = ver.artifact.path / HEAD_MEANS_FILE
    if path.exists():
        return {tuple(int(x) for x in k.split(".")): v for k, v in load_file(str(path)).items()}
    means = text_head_means(loaded, layers, text, mean_tokens, window)
    host = {f"{layer}.{h}": v.cpu().contiguous() for (layer, h), v in means.items()}
    atomic_write_with(path, lambda tmp: save_file(host, str(tmp)))
    return means


def toxic_direction_of(attribute_ver: StageVersion, loaded: LoadedModel) -> torch.Tensor:
    """Return the toxic direction `[d_model]` from the vocabulary toxicity of the attribute version's decode."""
    vt = read_token_toxicity(ArtifactDir(attribute_ver.home, "decode", attribute_ver.inputs["decode"]),
                             ["token_id", "score"])
    w_fold, _ = folded_unembedding(loaded.adapter, loaded.model)
    tox = torch.zeros(w_fold.shape[0], device=w_fold.device)
    ids = torch.from_numpy(vt.column("token_id").to_numpy().astype(np.int64)).to(w_fold.device)
    tox[ids] = torch.from_numpy(vt.column("score").to_numpy().astype(np.float32)).to(w_fold.device)
    return toxic_direction(w_fold, tox)


__all__ = ["head_means", "toxic_direction_of"]
