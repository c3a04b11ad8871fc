"""The stage registry is the one list of stages: the stage names, the chain of versions, the pipeline's stages,
the split stages, the CLI's stage choices and prefect.yaml's deployments all agree with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect import Flow

from loralens.flows.common import load_entry
from loralens.tasks.registry import REGISTRY, get_stage, stage_names

REPO = Path(__file__).resolve().parents[1]


def test_the_light_stage_tuple_and_the_split_stages_are_the_registry_s():
    from loralens.tasks.memory import SPLIT_STAGES
    from loralens.warehouse.constants import STAGES

    assert STAGES == stage_names() == ("cache", "train", "decode", "attribute", "select", "intervene")
    assert SPLIT_STAGES == tuple(s.name for s in REGISTRY if s.splits)


def test_parents_come_before_their_stage_and_entries_resolve():
    for i, stage in enumerate(REGISTRY):
        assert set(stage.parents) <= set(stage_names()[:i]), stage.name
        assert callable(load_entry(stage.run)), stage.run
        flow = load_entry(stage.flow)
        assert isinstance(flow, Flow), stage.flow
        assert stage.entrypoint.startswith("loralens/flows/") and (REPO / stage.entrypoint.split(":")[0]).is_file()


def test_unknown_stage_is_one_line_listing_the_stages():
    with pytest.raises(ValueError, match=r"^unknown stage 'nope'; stages: cache, train, decode, attribute, select, "
                                         r"intervene$"):
        get_stage("nope")


def test_prefect_yaml_has_the_pipeline_and_one_deployment_per_registered_stage():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = [(d["name"], d["entrypoint"]) for d in spec["deployments"]]
    assert deployments[0] == ("nightly", "loralens/flows/pipeline.py:pipeline")
    assert deployments[1:] == [(s.name, s.entrypoint) for s in REGISTRY]
    assert all(d["parameters"]["config_path"] is None for d in spec["deployments"])


def test_cli_stage_choices_are_the_registry_s():
    from loralens.flows.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    only = next(a for a in commands["run"]._actions if a.dest == "only")
    stage = next(a for a in commands["verify"]._actions if a.dest == "stage")
    assert only.help.endswith(", ".join(stage_names())) and ", ".join(stage_names()) in stage.help


def test_stage_chain_follows_the_registry(tiny_models, tmp_path):
    from loralens.config import parse_config
    from loralens.tasks.chain import stage_chain
    from loralens.tasks.stages.attribute import attribute_version
    from loralens.tasks.stages.cache import cache_version
    from loralens.tasks.stages.decode import decode_version
    from loralens.tasks.stages.select import select_version
    from loralens.tasks.stages.train import train_version
    from loralens.warehouse.artifacts import ArtifactError

    cfg = parse_config({"home": str(tmp_path), "model": {"name": str(tiny_models["gpt2"])},
                        "corpus": {"max_prompts_per_file": 4}})
    chain = stage_chain(cfg, "select")
    assert list(chain) == list(stage_names()[:5])
    cache = cache_version(cfg)
    train = train_version(cfg, cache)
    decode = decode_version(cfg, train)
    attribute = attribute_version(cfg, decode)
    assert chain == {"cache": cache, "train": train, "decode": decode, "attribute": attribute,
                     "select": select_version(cfg, attribute)}
    assert list(stage_chain(cfg, "train", cache)) == ["cache", "train"]
    for stage in REGISTRY[1:5]:  # each version names its parents' versions
        assert stage.lineage(chain[stage.name]) == [chain[p].version for p in stage.parents]
    with pytest.raises(ArtifactError, match="cache version .* is not complete"):  # head sets need complete inputs
        stage_chain(cfg, "intervene")
    with pytest.raises(ValueError, match="through: expected one of cache, train"):
        stage_chain(cfg, "nope")
