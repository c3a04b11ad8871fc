"""Results depend on science settings only: every stage version hashes exactly the config fields the stage reads.

Each field of every section is changed on its own (parametrized over a hand-written table of what reads it):
an execution setting leaves every version unchanged; a science setting changes the hashed config of exactly the
stages that read it, and the real versions of the first of them and of every stage downstream. A new config field
fails `test_every_field_is_classified` until it is added here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loralens.config import HeadSetConfig, PipelineConfig, parse_config
from loralens.tasks.stage_versions import science_config

STAGES = ("cache", "train", "decode", "attribute", "select", "intervene")
SAMPLING = {"select", "intervene"}  # select samples and measures perplexity with intervene's settings

# (section, field) -> (another valid value, the stages whose hashed config reads it). An empty set: an execution
# or content setting (content: its file's hash is an input of the version instead), or intervene.head_sets, which
# is hashed as the conditions it resolves to.
FIELDS: dict[tuple[str, str], tuple[object, set[str]]] = {
    ("model", "name"): ("GPT2", {"cache"}),  # "GPT2": the tiny gpt2 folder, filled in by `alternative`
    ("model", "revision"): ("v1", {"cache"}),
    ("model", "dtype"): ("bfloat16", {"cache"}),
    ("model", "device"): ("cpu", set()),
    ("model", "device_map"): ("auto", set()),
    ("model", "trust_remote_code"): (True, {"cache"}),
    ("corpus", "paths"): (("bundled:rtp_toxic_dev",), {"cache"}),
    ("corpus", "max_prompts_per_file"): (4, {"cache"}),
    ("corpus", "text_paths"): (("bundled:wikitext2_test",), {"cache"}),
    ("corpus", "text_tokens"): (64, {"cache"}),
    ("corpus", "text_start"): (0.25, {"cache"}),
    ("cache", "batch_size"): (3, set()),
    ("cache", "max_length"): (12, {"cache"}),
    ("cache", "prompts_per_shard"): (3, {"cache"}),
    ("cache", "store_dtype"): ("bfloat16", {"cache"}),
    ("cache", "top_k"): (5, {"cache"}),
    ("cache", "layers"): ((0,), {"cache"}),
    ("train", "form"): ("full", {"train"}),
    ("train", "rank"): (2, {"train"}),
    ("train", "alpha"): (4.0, {"train"}),
    ("train", "objective"): ("per_head", {"train"}),
    ("train", "loss"): ("subset", {"cache", "train"}),  # the cache then stores a target top-k
    ("train", "param_dtype"): ("bfloat16", {"train"}),
    ("train", "base_dtype"): ("float32", {"train"}),
    ("train", "lr"): (0.1, {"train"}),
    ("train", "weight_decay"): (0.1, {"train"}),
    ("train", "epochs"): (2, {"train"}),
    ("train", "max_steps"): (5, {"train"}),
    ("train", "micro_batch_tokens"): (16, {"train"}),
    ("train", "grad_accum_steps"): (2, {"train"}),
    ("train", "loss_chunk"): (8, set()),
    ("train", "eval_every_nth_prompt"): (5, {"train"}),
    ("train", "zero_stage"): (0, {"train"}),
    ("train", "world_size"): (2, {"train"}),
    ("train", "seed"): (1, {"train"}),
    ("train", "checkpoint_every"): (5, set()),
    ("train", "checkpoint_minutes"): (None, set()),
    ("train", "log_every"): (1, set()),
    ("train", "tf32"): (False, set()),
    ("train", "launcher"): ("torchrun", set()),
    ("train", "hostfile"): ("HOSTFILE", set()),  # one host, one slot: the world size the base config has
    ("decode", "top_k"): (5, {"decode"}),
    ("decode", "positions"): ("all", {"decode"}),
    ("decode", "chunk_tokens"): (8, set()),
    ("attribute", "scorer"): ("detoxify", {"attribute"}),  # also an input of decode and attribute (content)
    ("attribute", "scorer_options"): ({"checkpoint": "x.ckpt"}, set()),
    ("attribute", "lexicon"): ("LEXICON", set()),  # a real file, filled in by `alternative`
    ("attribute", "token_threshold"): (0.6, {"attribute"}),
    ("attribute", "prompt_threshold"): (0.6, {"attribute"}),
    ("attribute", "top_heads"): (3, set()),
    ("select", "selection_share"): (0.3, {"select"}),
    ("select", "max_prompts"): (2, {"select"}),
    ("select", "batch_prompts"): (2, set()),
    ("select", "max_prompt_tokens"): (32, {"select"}),
    ("select", "max_continuation_tokens"): (8, {"select"}),
    ("select", "exact_heads"): (None, {"select"}),
    ("select", "candidates"): (2, {"select"}),
    ("select", "method"): ("attribution_patching", {"select"}),
    ("select", "tries"): (1, {"select"}),
    ("select", "k"): (1, {"select"}),
    ("select", "steering"): ({"enabled": False, "sizes": [1]}, {"select"}),
    ("goal", "max_head_share"): (0.1, SAMPLING),
    ("goal", "ppl_rel"): (0.1, SAMPLING),
    ("goal", "emt_rel"): (-0.5, {"intervene"}),
    ("goal", "vs_random"): (2.0, {"intervene"}),
    ("intervene", "prompts"): (("bundled:rtp_nontoxic_dev",), {"intervene"}),
    ("intervene", "max_prompts"): (2, {"intervene"}),
    ("intervene", "held_out"): (False, {"intervene"}),
    ("intervene", "k"): (2, {"intervene"}),
    ("intervene", "max_new_tokens"): (10, SAMPLING),
    ("intervene", "top_p"): (0.5, SAMPLING),
    ("intervene", "seed"): (1, SAMPLING),
    ("intervene", "kind"): ("mean", {"intervene"}),
    ("intervene", "factor"): (0.5, {"intervene"}),
    ("intervene", "head_sets"): ((HeadSetConfig(heads="L0H0"),), set()),
    ("intervene", "random_seeds"): ((1,), {"intervene"}),
    ("intervene", "ppl_tokens"): (100, SAMPLING),
    ("intervene", "ppl_window"): (64, SAMPLING),
    ("intervene", "mean_tokens"): (100, {"intervene"}),
    ("intervene", "ablation_candidates"): (1, {"intervene"}),
    ("intervene", "ablation_method"): ("lens_mean", {"intervene"}),
    ("intervene", "ablation_prompts"): (4, {"intervene"}),
    ("intervene", "ablation_k"): (1, {"intervene"}),
    ("intervene", "n_boot"): (10, {"intervene"}),
    ("intervene", "batch_prompts"): (2, set()),
    ("run", "workers"): (2, set()),
    ("run", "dask_address"): ("tcp://localhost:8786", set()),
}
# Where the first changed real version is not the first stage whose config reads the field: the field enters a
# later (or earlier) stage as content (prompt fingerprints, the lexicon's hash, resolved head sets).
FIRST_CHANGED = {("intervene", "prompts"): "select", ("intervene", "held_out"): "select",
                 ("attribute", "lexicon"): "attribute", ("intervene", "head_sets"): "intervene"}
# Real versions that need what this test does not build: another scorer's checkpoint, attribute's scores.
NOT_COMPUTED = {("attribute", "scorer"), ("attribute", "scorer_options"), ("intervene", "ablation_candidates")}
SECTIONS = [name for name in PipelineConfig.model_fields if name != "home"]


def base_config(home: Path, model: Path) -> dict:
    return {"home": str(home), "model": {"name": str(model)},
            "corpus": {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"], "max_prompts_per_file": 6},
            "cache": {"batch_size": 4, "prompts_per_shard": 4, "max_length": 16},
            "train": {"micro_batch_tokens": 32, "epochs": 1},
            "select": {"max_prompts": 4, "steering": {"enabled": False}},  # on, intervene reads select's output
            "intervene": {"max_prompts": 4, "head_sets": []}}


def alternative(base: dict, section: str, field: str, tiny_models, tmp_path: Path) -> PipelineConfig:
    """Return the base config with one field changed to its value in FIELDS."""
    value = FIELDS[(section, field)][0]
    if value == "GPT2":
        value = str(tiny_models["gpt2"])
    if value == "LEXICON":
        (tmp_path / "lexicon.txt").write_text("idiot\n")
        value = str(tmp_path / "lexicon.txt")
    if value == "HOSTFILE":  # a hostfile run's version hashes the world size it starts (tests/test_devices.py)
        (tmp_path / "hostfile").write_text("localhost slots=1\n")
        value = str(tmp_path / "hostfile")
    if isinstance(value, tuple) and value and isinstance(value[0], HeadSetConfig):
        value = [v.model_dump(exclude_none=True) for v in value]
    return parse_config({**base, section: {**base.get(section, {}), field: value}})


@pytest.fixture(scope="module")
def pipeline_base(tiny_models, tmp_path_factory):
    """The base config and its real, complete cache (intervene's version reads the cached layers)."""
    from loralens.tasks.stages.cache import cache_version, run_cache_stage

    base = base_config(tmp_path_factory.mktemp("versions") / "home", tiny_models["llama"])
    cfg = parse_config(base)
    cache = cache_version(cfg)
    run_cache_stage(cfg, cache)
    return base, cache


def versions(cfg: PipelineConfig, complete_cache) -> dict[str, str]:
    """Return every stage's version under `cfg` (intervene reads its layers from the base's complete cache)."""
    from loralens.tasks.chain import stage_chain
    from loralens.tasks.stages.intervene import intervene_version

    chain = stage_chain(cfg, "select")
    intervene, _ = intervene_version(cfg, chain["select"], chain["attribute"], complete_cache)
    return {**{s: v.version for s, v in chain.items()}, "intervene": intervene.version}


def test_every_field_is_classified_and_described():
    fields = {(s, f) for s in SECTIONS for f in type(getattr(PipelineConfig(), s)).model_fields}
    assert fields == set(FIELDS), "classify new config fields in tests/test_science_versions.py"
    for (section, field), (_, readers) in FIELDS.items():
        model = type(getattr(PipelineConfig(), section))
        assert model.model_fields[field].description, f"{section}.{field} has no description"
        hashed_elsewhere = (section, field) == ("intervene", "head_sets")
        assert (model.field_kind(field) == "science") == (bool(readers) or hashed_elsewhere), (section, field)
    assert all(f.description for f in PipelineConfig.model_fields.values())


@pytest.mark.parametrize(("section", "field"), sorted(FIELDS))
def test_each_stage_hashes_exactly_the_fields_it_reads(section, field, tiny_models, tmp_path):
    base = base_config(tmp_path / "home", tiny_models["llama"])
    before, after = parse_config(base), alternative(base, section, field, tiny_models, tmp_path)
    assert getattr(before, section) != getattr(after, section)
    changed = {s for s in STAGES if science_config(before, s) != science_config(after, s)}
    assert changed == FIELDS[(section, field)][1]


@pytest.mark.parametrize(("section", "field"), sorted(set(FIELDS) - NOT_COMPUTED))
def test_versions_change_from_the_first_reader_on(section, field, pipeline_base, tiny_models, tmp_path,
                                                  _base_versions):
    base, cache = pipeline_base
    after = versions(alternative(base, section, field, tiny_models, tmp_path), cache)
    readers = FIELDS[(section, field)][1]
    first = FIRST_CHANGED.get((section, field)) or (min(readers, key=STAGES.index) if readers else None)
    expect_changed = set(STAGES[STAGES.index(first):]) if first else set()
    assert {s for s in STAGES if after[s] != _base_versions[s]} == expect_changed


def test_home_and_same_content_lexicon_leave_versions_unchanged(pipeline_base, tmp_path, _base_versions):
    base, cache = pipeline_base
    assert versions(parse_config({**base, "home": str(tmp_path / "elsewhere")}), cache) == _base_versions
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("idiot\n")
    a, b = (versions(parse_config({**base, "attribute": {"lexicon": str(tmp_path / n)}}), cache)
            for n in ("a.txt", "b.txt"))
    assert a == b and a["attribute"] != _base_versions["attribute"]


@pytest.fixture(scope="module")
def _base_versions(pipeline_base):
    base, cache = pipeline_base
    return versions(parse_config(base), cache)
