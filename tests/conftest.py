"""Shared fixtures: a tiny real tokenizer, tiny random models of each family, one Prefect test server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loralens.prefect_env import configure_prefect_env

configure_prefect_env()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a model hub: a hub id fails fast instead

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real byte-level BPE tokenizer trained in the test on the bundled WikiText text."""
    return build_tiny_tokenizer()


def train_bpe_tokenizer(lines: list[str], vocab_size: int):
    """Return a real byte-level BPE tokenizer trained on `lines` (eos = pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_tokenizer():
    """Return a byte-level BPE tokenizer (vocab 400) trained on the first 2000 bundled WikiText lines."""
    from loralens.warehouse.corpus import bundled_path

    lines = bundled_path("wikitext2_test").read_text(encoding="utf-8").splitlines()[:2000]
    return train_bpe_tokenizer(lines, vocab_size=400)


def tiny_config(family: str, vocab: int):
    """Return a small random-model config of one architecture family (GQA where the family has it)."""
    import transformers as T

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "llama":
        return T.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                             num_hidden_layers=3, max_position_embeddings=128, **common)
    if family == "mistral":
        return T.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
                               num_hidden_layers=3, max_position_embeddings=128, **common)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                             num_hidden_layers=3, max_position_embeddings=128, **common)
    if family == "qwen3":  # head_dim * heads != hidden_size: z is wider than d_model
        return T.Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                             intermediate_size=96, num_hidden_layers=3, max_position_embeddings=128, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=64, n_head=4, n_layer=3, n_positions=128, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=3,
                               max_position_embeddings=128, **common)
    raise ValueError(family)


def save_tiny_model(family: str, folder: Path, tokenizer, seed: int = 0) -> Path:
    """Build a random model of `family` from a config, randomise every weight and bias, save it with a tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Non-zero biases and non-unit norm gains, so bias handling and norm folding are really tested.
            is_norm = "norm" in name or "ln_" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_((0.3 if is_norm else 0.08) * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A saved tiny random model folder per architecture family."""
    root = tmp_path_factory.mktemp("models")
    return {f: save_tiny_model(f, root / f, tiny_tokenizer) for f in FAMILIES}


@pytest.fixture(scope="module")
def one_thread_module():
    """Run a module's tests with one torch thread, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (SQLite, local) shared by every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def dask_cluster(prefect_server):
    """One real `distributed.LocalCluster` of 2 single-threaded worker processes for the session's Dask tests
    (flows reach it through `dask_address`, i.e. prefect-dask's DaskTaskRunner on an existing scheduler)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tiny_pipeline(prefect_server, tiny_models, tmp_path_factory):
    """One complete pipeline run in this process (tests/test_intervene.py's config on the tiny llama): (config,
    results). Tests that write must copy its home first."""
    from loralens.flows.pipeline import pipeline
    from tests.test_intervene import config

    cfg = config(tmp_path_factory.mktemp("intervene") / "home", tiny_models["llama"])
    return cfg, pipeline(config=cfg)


@pytest.fixture(scope="session")
def planted_run(prefect_server, tmp_path_factory):
    """One real pipeline run on the tiny llama with a planted toxic head (tests/test_attribution.py), shared by the
    attribution and API tests: (config, results, warehouse path)."""
    from test_attribution import planted_pipeline

    return planted_pipeline(tmp_path_factory.mktemp("planted"))
