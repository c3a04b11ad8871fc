"""The real embedded model: SmolLM2-135M-Instruct from its PyPI package, converted once, loaded offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loralens.config import default_home, parse_config
from loralens.lens.heads.hooks import capture, head_contributions
from loralens.lens.runtime.adapters import out_proj_bias, out_proj_weight
from loralens.lens.runtime.models import load_model
from loralens.tasks.stages.cache import cache_version, run_cache_stage
from loralens.warehouse.activation_cache import read_h_final, read_tokens
from loralens.warehouse.corpus import load_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    # The converted folder lives under the shared project home so the conversion happens once per machine.
    return load_model("smollm2-135m-instruct", default_home())


def test_converted_folder_does_not_record_the_environment(smol):
    import json
    from pathlib import Path

    tok_cfg = json.loads((Path(smol.path) / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tok_cfg  # else HF_HUB_OFFLINE would change the model's fingerprint


def test_embedded_model_dims_and_reconstruction(smol):
    d = smol.dims
    assert (d.n_layers, d.n_heads, d.d_head, d.d_model, d.vocab) == (30, 9, 64, 576, 49152)
    assert smol.model.config.num_key_value_heads == 3  # grouped-query attention
    enc = smol.tokenizer(["People think that we are just a bunch of"], return_tensors="pt")
    layers = [0, 14, 29]
    with torch.no_grad(), capture(smol.model, smol.adapter, layers, attn_out=True) as cap:
        logits = smol.model(**enc).logits
    for layer in layers:
        contrib = head_contributions(cap.z[layer], out_proj_weight(smol.adapter, smol.model, layer, d))
        assert out_proj_bias(smol.adapter, smol.model, layer) is None
        torch.testing.assert_close(contrib.sum(-2), cap.attn_out[layer], atol=1e-4, rtol=1e-4)
    assert smol.tokenizer.decode(logits[0, -1].argmax()).strip() != ""


def test_cached_targets_equal_model_logits(smol, tmp_path):
    cfg = parse_config({
        "home": str(tmp_path),
        "model": {"name": smol.path},
        "corpus": {"paths": ["bundled:rtp_toxic_dev"], "max_prompts_per_file": 3},
        "cache": {"layers": [0, 29], "batch_size": 3},
        "train": {"loss": "subset"},  # a subset-loss cache also stores the target's top-k and log-sum-exp
    })
    summary = run_cache_stage(cfg, cache_version(cfg))
    tokens = read_tokens(cache_version(cfg).artifact)
    h = torch.from_numpy(read_h_final(tokens, 576).copy())
    with torch.no_grad():
        recomputed = smol.model.lm_head(h)
    # the model's own logits for the first prompt, from a fresh forward pass
    first = np.flatnonzero(tokens.column("prompt_idx").to_numpy() == 0)
    prompt = load_corpus(["bundled:rtp_toxic_dev"], 1).prompts[0]
    enc = smol.tokenizer(prompt.text, return_tensors="pt")
    with torch.no_grad():
        logits = smol.model(**enc).logits[0]
    torch.testing.assert_close(recomputed[first], logits, atol=1e-4, rtol=1e-4)
    lse = torch.from_numpy(tokens.column("lse").to_numpy()[first])
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=1e-4, rtol=1e-5)
    assert summary["n_layers"] == 2 and summary["bytes_per_token"] > 2 * 576 * 2
