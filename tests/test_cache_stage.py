"""The cache stage on tiny real models: Parquet round trip, DuckDB over metadata, versions, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from loralens.config import ConfigError, parse_config
from loralens.lens.heads.capture import from_storage, pad_batch, target_logits
from loralens.lens.heads.hooks import capture, head_contributions
from loralens.lens.runtime.adapters import out_proj_weight
from loralens.lens.runtime.models import load_model
from loralens.tasks.stages.cache import cache_version, run_cache_stage
from loralens.warehouse.activation_cache import read_h_final, read_layer_z, read_prompts, read_tokens
from loralens.warehouse.artifacts import ArtifactError
from loralens.warehouse.db import warehouse_path


def make_cfg(home: Path, model: Path, **cache):
    cache = {"batch_size": 4, "prompts_per_shard": 6, "max_length": 24, "top_k": 8} | cache
    return parse_config({
        "home": str(home),
        "model": {"name": str(model)},
        "corpus": {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"], "max_prompts_per_file": 10},
        "cache": cache,
    })


def run(cfg, **kw):
    return run_cache_stage(cfg, cache_version(cfg), **kw)


@pytest.fixture(scope="module")
def cached(tiny_models, tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("home"), tiny_models["llama"])
    return cfg, run(cfg)


def test_round_trip_reproduces_head_contributions_and_targets(cached):
    cfg, summary = cached
    loaded = load_model(cfg.model.name, cfg.home)
    adir = cache_version(cfg).artifact
    tokens = read_tokens(adir)
    prompts = read_prompts(adir).to_pylist()
    assert summary["n_prompts"] == 20 and tokens.num_rows == summary["n_tokens"] == sum(p["n_tokens"] for p in prompts)

    # Re-run the model on one cached prompt and compare to what the cache holds for it.
    p = prompts[3]
    ids = loaded.tokenizer(p["text"])["input_ids"][: cfg.cache.max_length]
    rows = np.flatnonzero(tokens.column("prompt_idx").to_numpy() == p["prompt_idx"])
    assert tokens.column("position").to_numpy()[rows].tolist() == list(range(len(ids)))
    assert tokens.column("token_id").to_numpy()[rows].tolist() == ids
    x, m = pad_batch([ids], 0)
    with torch.no_grad(), capture(loaded.model, loaded.adapter, [1]) as cap:
        logits = loaded.model(input_ids=x, attention_mask=m).logits[0]
    z_cached = from_storage(read_layer_z(adir, 1, loaded.dims.z_width)[rows], "float16").float()
    w_o = out_proj_weight(loaded.adapter, loaded.model, 1, loaded.dims)
    torch.testing.assert_close(head_contributions(z_cached, w_o), head_contributions(cap.z[1][0], w_o),
                               atol=2e-3, rtol=1e-2)
    h = torch.from_numpy(read_h_final(tokens, loaded.dims.d_model)[rows].copy())
    torch.testing.assert_close(target_logits(loaded, h), logits, atol=1e-5, rtol=1e-5)
    lse = torch.from_numpy(tokens.column("lse").to_numpy()[rows])
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)
    top = np.stack(tokens.column("topk_ids").to_numpy(zero_copy_only=False)[rows])
    assert (top[:, 0] == logits.argmax(-1).numpy()).all()
    nxt = tokens.column("next_token_id").to_numpy()[rows]
    assert nxt[:-1].tolist() == ids[1:] and nxt[-1] == -1


def test_duckdb_queries_cache_metadata_and_layers(cached):
    cfg, summary = cached
    root = cache_version(cfg).artifact.path
    con = duckdb.connect()
    per_prompt = con.execute(
        f"SELECT p.prompt_id, p.n_tokens, count(*) AS n FROM read_parquet('{root}/tokens/*.parquet') t "
        f"JOIN read_parquet('{root}/prompts/*.parquet') p USING (prompt_idx) GROUP BY ALL"
    ).fetchall()
    assert len(per_prompt) == 20 and all(n_tokens == n for _, n_tokens, n in per_prompt)
    layer_rows = con.execute(
        f"SELECT layer, count(*) FROM read_parquet('{root}/z/*/*.parquet', hive_partitioning=true) "
        "GROUP BY layer ORDER BY layer"
    ).fetchall()
    assert layer_rows == [(i, summary["n_tokens"]) for i in range(3)]
    reg = duckdb.connect(str(warehouse_path(cfg.home)), read_only=True).execute(
        "SELECT stage, status, rows FROM artifacts WHERE version = ?", [summary["version"]]
    ).fetchall()
    assert reg == [("cache", "complete", summary["n_tokens"])]


def test_rerun_is_skipped_and_changed_config_makes_new_version(cached, tiny_models):
    cfg, summary = cached
    again = run(cfg)
    assert again["cached"] and again["version"] == summary["version"]
    changed = make_cfg(cfg.home, tiny_models["llama"], top_k=4)
    new = run(changed)
    assert not new["cached"] and new["version"] != summary["version"]
    assert cache_version(cfg).artifact.is_complete() and cache_version(changed).artifact.is_complete()


def test_corrupted_shard_is_redone(tiny_models, tmp_path):
    cfg = make_cfg(tmp_path, tiny_models["gpt2"], layers=[0, 2])
    first = run(cfg)
    adir = cache_version(cfg).artifact
    before = read_tokens(adir)
    victim = adir.path / "z/layer=2/shard-00001.parquet"
    victim.write_bytes(victim.read_bytes()[:-20] + b"\0" * 20)  # same size, wrong bytes
    (adir.path / "manifest.json").unlink()  # as if the run had been killed before finishing
    second = run(cfg)
    assert second["shards_redone"] == 1 and second["n_tokens"] == first["n_tokens"]
    assert read_tokens(adir).equals(before)
    assert pq.read_table(victim).num_rows == pq.read_table(adir.path / "z/layer=0/shard-00001.parquet").num_rows


def test_truncation_is_counted_and_bad_layers_rejected(tiny_models, tmp_path):
    summary = run(make_cfg(tmp_path, tiny_models["gpt_neox"], max_length=5))
    assert summary["truncated_prompts"] > 0 and summary["max_length"] == 5
    with pytest.raises(ConfigError, match=r"cache.layers: \[7\] out of range for 3 layers"):
        run(make_cfg(tmp_path, tiny_models["gpt_neox"], layers=[0, 7]))


def test_unwritable_artifact_folder_is_a_clear_error(tiny_models, tmp_path):
    cfg = make_cfg(tmp_path, tiny_models["llama"])
    blocker = tmp_path / "artifacts" / "cache"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where a folder should be")
    with pytest.raises(ArtifactError, match="cannot write artifact folder"):
        run(cfg)


WORKER = """
import json, sys
from loralens.config import parse_config
from loralens.tasks.stages.cache import cache_version, run_cache_stage
cfg = parse_config(json.loads(sys.argv[1]))
run_cache_stage(cfg, cache_version(cfg))
"""


def test_sigkill_mid_cache_then_resume_equals_uninterrupted(tiny_models, tmp_path):
    model = tiny_models["qwen2"]
    raw = {"model": {"name": str(model)},
           "corpus": {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"]},
           "cache": {"batch_size": 8, "prompts_per_shard": 8, "max_length": 24, "top_k": 8}}
    killed_home, clean_home = tmp_path / "killed", tmp_path / "clean"
    cfg_killed = parse_config(raw | {"home": str(killed_home)})
    adir = cache_version(cfg_killed).artifact
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(raw | {"home": str(killed_home)})],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((adir.path / "_shards").glob("*.json"))) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((adir.path / "_shards").glob("*.json")))
    assert 5 <= done_at_kill < 150 and not adir.is_complete(), "the kill must land mid-way"

    resumed = run(cfg_killed)
    clean = run(parse_config(raw | {"home": str(clean_home)}))
    assert resumed["version"] == clean["version"] and resumed["n_tokens"] == clean["n_tokens"]
    clean_dir = cache_version(parse_config(raw | {"home": str(clean_home)})).artifact
    assert read_tokens(adir).equals(read_tokens(clean_dir))
    assert read_prompts(adir).equals(read_prompts(clean_dir))
    for layer in range(3):
        np.testing.assert_array_equal(read_layer_z(adir, layer, 64), read_layer_z(clean_dir, layer, 64))
    assert not list(adir.path.rglob(".tmp-*"))
    manifest = adir.manifest()
    assert sum(f["rows"] for f in manifest["files"] if f["path"].startswith("tokens/")) == clean["n_tokens"]


def test_shards_split_over_workers_equal_one_run(prefect_server, tiny_models, tmp_path):
    """Two workers caching disjoint shard lists (then a finalizing run) give the single run's files exactly."""
    from loralens.flows.cache import cache_activations

    def cfg(home: Path) -> dict:
        return {"home": str(home), "model": {"name": str(tiny_models["llama"])},
                "corpus": {"paths": ["bundled:toxigen_sentences"], "max_prompts_per_file": 10},
                "cache": {"batch_size": 4, "prompts_per_shard": 3, "max_length": 16}}

    single = cache_activations(config=cfg(tmp_path / "one"))
    first = cache_activations(config=cfg(tmp_path / "split"), shards=[0, 2])
    assert first["partial"] and first["shards_done"] == 2 and first["n_shards"] == 4
    second = cache_activations(config=cfg(tmp_path / "split"), shards=[1, 3])
    assert not second.get("partial") and second["version"] == single["version"]
    final = cache_activations(config=cfg(tmp_path / "split"))
    assert final["cached"]
    mapped = cache_activations(config=cfg(tmp_path / "mapped"), workers=2)
    manifests = [json.loads((home / "artifacts" / "cache" / single["version"] / "manifest.json").read_text())
                 for home in (tmp_path / "one", tmp_path / "split", tmp_path / "mapped")]
    files = [sorted((f["path"], f["sha256"]) for f in m["files"]) for m in manifests]
    assert files[0] == files[1] == files[2] and mapped["n_prompts"] == single["n_prompts"]


def test_shard_corrupted_after_completion_is_redone_by_the_flow(prefect_server, tiny_models, tmp_path):
    from loralens.flows.cache import cache_activations

    cfg = {"home": str(tmp_path), "model": {"name": str(tiny_models["gpt2"])},
           "corpus": {"paths": ["bundled:toxigen_sentences"], "max_prompts_per_file": 8},
           "cache": {"batch_size": 4, "prompts_per_shard": 4, "max_length": 16}}
    first = cache_activations(config=cfg)
    manifest = Path(first["path"]) / "manifest.json"
    before = json.loads(manifest.read_text())["files"]
    shard = Path(first["path"]) / "z" / "layer=1" / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    again = cache_activations(config=cfg)
    assert not again["cached"] and again["shards_redone"] == 1 and again["version"] == first["version"]
    assert json.loads(manifest.read_text())["files"] == before  # the redone shard is byte-identical


def test_concurrent_workers_prepare_the_same_folder(tmp_path):
    """Mapped shard workers prepare one artifact folder at once; none may trip over another's probe file."""
    from concurrent.futures import ThreadPoolExecutor

    from loralens.warehouse.artifacts import ArtifactDir, atomic_write_bytes

    adir = ArtifactDir(tmp_path, "cache", "0123456789abcdef")

    def work(i: int) -> None:
        for j in range(200):
            adir.prepare(clean_tmp=False)
            atomic_write_bytes(adir.path / f"w{i}.bin", bytes([j % 256]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert sorted(p.name for p in adir.path.iterdir()) == [f"w{i}.bin" for i in range(8)]


def test_target_top_k_is_stored_only_for_a_subset_loss(tiny_models, tmp_path):
    """An exact-loss cache (the default) computes no top-k nor log-sum-exp; a subset-loss cache stores both."""
    from loralens.config import ConfigError

    def config(loss: str, **cache):
        return parse_config({"home": str(tmp_path), "model": {"name": str(tiny_models["llama"])},
                             "corpus": {"max_prompts_per_file": 4}, "train": {"loss": loss},
                             "cache": {"prompts_per_shard": 8, "max_length": 12} | cache})

    exact, subset = config("exact"), config("subset")
    assert (exact.target_top_k, subset.target_top_k) == (0, 64)
    assert cache_version(exact).version != cache_version(subset).version  # what is stored is what is versioned
    run(exact)
    run(subset)
    stored = {"topk_ids", "topk_logprobs", "lse"}
    assert not stored & set(read_tokens(cache_version(exact).artifact).column_names)
    assert stored <= set(read_tokens(cache_version(subset).artifact).column_names)
    assert read_tokens(cache_version(subset).artifact).column("topk_ids").type.list_size == 64
    with pytest.raises(ConfigError, match=r"^config error: cache.top_k: 0 stores no target top-k, but train.loss"):
        config("subset", top_k=0)


def test_training_text_is_cached_in_text_shards_that_decode_never_reads(tiny_models, tmp_path):
    from loralens.lens.heads.capture import text_windows
    from loralens.warehouse.activation_cache import prompt_shards
    from loralens.warehouse.corpus import load_training_text

    cfg = make_cfg(tmp_path / "home", tiny_models["llama"])
    cfg = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={
        "text_paths": ("bundled:wikitext2_test",), "text_tokens": 100})})
    summary = run(cfg)
    adir = cache_version(cfg).artifact
    tokens = read_tokens(adir)
    idx = tokens.column("prompt_idx").to_numpy()
    # 20 prompts in 4 shards of 6, then the text: 100 tokens in windows of <= 24 tokens, 6 windows a shard
    assert summary["n_prompts"] == 20 and summary["n_prompt_shards"] == 4
    assert summary["text_tokens"] == (idx >= 20).sum() == 100 and summary["text_windows"] == 5
    assert sorted(adir.done_shards()) == [0, 1, 2, 3, 4] and prompt_shards(adir) == [0, 1, 2, 3]
    assert len(read_prompts(adir)) == 20  # no prompt rows for text windows: attribute and select never see them
    # The windows are the text's second half (text_start 0.5), in order, each behind the tokenizer's own prefix.
    tok = load_model(cfg.model.name, cfg.home).tokenizer
    text = load_training_text(cfg.corpus.text_paths, 0.5).text
    assert not text.startswith(load_training_text(cfg.corpus.text_paths, 0.0).text[:200])
    prefix = tok("", add_special_tokens=True)["input_ids"]
    expected = text_windows(tok, text, 24, 100)
    assert all(w[: len(prefix)] == prefix and len(w) <= 24 for w in expected)
    assert [t for w in expected for t in w[len(prefix):]] == tok(text[:2000], add_special_tokens=False)[
        "input_ids"][: 100 - len(prefix) * len(expected)]
    stored = [tokens.column("token_id").to_numpy()[idx == 20 + j].tolist() for j in range(5)]
    assert stored == expected
    # The text is part of the version: other text or another amount is another version; a bad path names itself.
    assert cache_version(cfg).version != cache_version(make_cfg(tmp_path / "home", tiny_models["llama"])).version
    more = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"text_tokens": 101})})
    assert cache_version(more).version != cache_version(cfg).version
    bad = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"text_paths": (str(tmp_path / "no.txt"),)})})
    with pytest.raises(ValueError, match="no.txt"):
        cache_version(bad)
