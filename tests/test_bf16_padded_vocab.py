"""bf16 end to end on a tiny model whose embedding has more rows than its tokenizer has tokens (as in Llama 3)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from loralens.warehouse.activation_cache import read_h_final, read_tokens
from loralens.warehouse.artifacts import ArtifactDir
from loralens.warehouse.db import warehouse_path
from tests.conftest import tiny_config

EXTRA_ROWS = 40  # embedding rows no token of the tokenizer maps to


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random llama saved in bf16 with `EXTRA_ROWS` more embedding rows than the tokenizer's tokens."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("bf16") / "llama-bf16"
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tiny_tokenizer) + EXTRA_ROWS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.3 * torch.randn_like(p)) if "norm" in name else 0.08 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_run(prefect_server, bf16_model, tmp_path_factory) -> dict:
    from loralens.flows.pipeline import pipeline

    home = tmp_path_factory.mktemp("home")
    config = {"home": str(home), "model": {"name": str(bf16_model), "dtype": "bfloat16"},
              "corpus": {"max_prompts_per_file": 12}, "cache": {"prompts_per_shard": 8, "max_length": 16},
              "train": {"micro_batch_tokens": 32, "epochs": 3, "lr": 1e-2}}
    results = {}
    for stage in ("cache", "train", "decode", "attribute"):
        results |= pipeline(config=config, only=stage)
    return {"home": home, "results": results}


def test_cache_target_reproduces_the_models_bf16_logits(bf16_run, bf16_model):
    """The cached lm_head input times the fp32 unembedding equals the bf16 model's own logits within bf16 rounding."""
    from transformers import AutoModelForCausalLM

    res = bf16_run["results"]["cache"]
    cache = ArtifactDir(bf16_run["home"], "cache", res["version"])
    tokens = read_tokens(cache, [0])
    first = tokens.column("prompt_idx").to_numpy() == tokens.column("prompt_idx").to_numpy()[0]
    ids = torch.from_numpy(tokens.column("token_id").to_numpy()[first].astype(np.int64))[None]
    model = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.bfloat16)
    with torch.no_grad():
        own = model(input_ids=ids).logits[0].float()  # [n, V] as the bf16 model computes them
    h_final = torch.from_numpy(read_h_final(tokens, model.config.hidden_size)[first])
    target = h_final @ model.lm_head.weight.detach().float().T  # what training recomputes, in fp32
    assert own.shape[-1] == target.shape[-1] == model.config.vocab_size
    # Stated tolerance: bf16 keeps 8 significant bits, so the model's own logits are rounded by <= 2^-8 relative;
    # the fp32 target differs from them by at most 1% of the logit range.
    span = float(own.max() - own.min())
    assert float((own - target).abs().max()) <= 0.01 * span
    assert float((own - target).abs().max()) > 0  # and it is not the same computation: the fp32 target is finer


def test_lenses_still_beat_the_logit_lens_in_bf16(bf16_run):
    res = bf16_run["results"]["train"]
    fid = json.loads((Path(res["path"]) / "fidelity.json").read_text())
    assert np.mean(fid["layer_lens"]) < np.mean(fid["layer_logit_lens"])


def test_embedding_rows_the_tokenizer_never_produces_go_through_attribute(bf16_run, tiny_tokenizer):
    version = bf16_run["results"]["attribute"]["version"]
    with duckdb.connect(str(warehouse_path(bf16_run["home"])), read_only=True) as con:
        n, padded, padded_score = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE token_id >= ?), max(score) FILTER (WHERE token_id >= ?) "
            "FROM vocab_toxicity WHERE version = ?", [len(tiny_tokenizer)] * 2 + [version]).fetchone()
        heads = con.execute("SELECT count(DISTINCT (layer, head)) FROM head_scores WHERE version = ?",
                            [version]).fetchone()[0]
    assert n == len(tiny_tokenizer) + EXTRA_ROWS and padded == EXTRA_ROWS
    assert padded_score == 0  # ids the tokenizer cannot decode are scored 0, never sent to the scorer
    assert heads == 3 * 4
