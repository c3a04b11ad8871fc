"""Real Prefect flow runs (one local test server per session): a second run with the same config is cached."""

from __future__ import annotations

import asyncio

import pytest
from prefect.client.orchestration import get_client

from loralens.flows.cache import cache_activations
from loralens.flows.pipeline import pipeline


async def _task_states(flow_run_id, prefix: str = "cache") -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return [r.state.name for r in runs if r.name.startswith(prefix)]


def test_second_flow_run_is_cached(prefect_server, tiny_models, tmp_path):
    config = {
        "home": str(tmp_path),
        "model": {"name": str(tiny_models["gpt2"])},
        "corpus": {"paths": ["bundled:toxigen_sentences"], "max_prompts_per_file": 12},
        "cache": {"batch_size": 4, "prompts_per_shard": 4, "max_length": 16},
        "train": {"micro_batch_tokens": 16, "epochs": 1},
        "intervene": {"max_prompts": 4, "k": 2, "max_new_tokens": 4, "ppl_tokens": 100, "ppl_window": 50,
                      "head_sets": [{"top_n": 2}], "ablation_candidates": 1, "ablation_prompts": 2, "n_boot": 20},
    }
    first_state = cache_activations(config=config, return_state=True)
    first = first_state.result()
    assert not first["cached"] and first["n_prompts"] == 12
    second_state = cache_activations(config=config, return_state=True)
    second = second_state.result()
    assert second["cached"] and second["version"] == first["version"]
    assert asyncio.run(_task_states(first_state.state_details.flow_run_id)) == ["Completed"]
    assert asyncio.run(_task_states(second_state.state_details.flow_run_id)) == ["Cached"]

    # A deleted artifact is never a stale cache hit: the task runs again and rebuilds it.
    import shutil

    shutil.rmtree(tmp_path / "artifacts")
    results = pipeline(config=config)
    assert not results["cache"]["cached"] and results["cache"]["version"] == first["version"]
    assert not results["train"]["cached"] and results["train"]["heads"] == 3 * 4

    # Re-running only the train stage redoes nothing; forcing it redoes training but not the cache.
    again = pipeline(config=config, only="train")
    assert list(again) == ["train"] and again["train"]["cached"]
    forced = pipeline(config=config, only="train", force=True)
    assert not forced["train"]["cached"] and forced["train"]["version"] == results["train"]["version"]

    # The warehouse is an index of the manifests: deleted, it comes back on the next run, whose every stage is a
    # Prefect cache hit (no task body runs) that puts the version's rows back from its artifact.
    from test_rebuild import warehouse_answers

    before = warehouse_answers(tmp_path)
    (tmp_path / "warehouse.duckdb").unlink()
    state = pipeline(config=config, return_state=True)
    assert all(r["cached"] for r in state.result().values())
    assert sorted(asyncio.run(_task_states(state.state_details.flow_run_id, ""))) == ["Cached"] * 6
    assert warehouse_answers(tmp_path) == before

    # A Prefect cache hit never makes an incomplete version complete: without its manifest the task runs again.
    (tmp_path / "artifacts" / "cache" / first["version"] / "manifest.json").unlink()
    again = cache_activations(config=config, return_state=True)
    assert not again.result()["cached"]
    assert asyncio.run(_task_states(again.state_details.flow_run_id)) == ["Completed"]


def test_too_small_cache_for_the_batch_is_a_config_error(prefect_server, tiny_models, tmp_path):
    from loralens.config import ConfigError

    config = {"home": str(tmp_path), "model": {"name": str(tiny_models["gpt2"])},
              "corpus": {"paths": ["bundled:toxigen_sentences"], "max_prompts_per_file": 4},
              "train": {"micro_batch_tokens": 100000}}
    with pytest.raises(ConfigError, match="train.micro_batch_tokens"):
        pipeline(config=config)


def test_pipeline_rejects_unknown_stage(prefect_server):
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        pipeline(only="nope")
