"""Config validation at the edge and the artifact-version function."""

from __future__ import annotations

import pytest

from loralens.config import ConfigError, load_config, parse_config
from loralens.warehouse.versions import artifact_version


def test_unknown_key_and_bad_value_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^config error: unknown key 'cache.batchsize'$"):
        parse_config({"cache": {"batchsize": 4}})
    with pytest.raises(ConfigError, match=r"^config error: cache.batch_size: Input should be greater than 0"):
        parse_config({"cache": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"cache.store_dtype"):
        parse_config({"cache": {"store_dtype": "float64"}})
    bad = tmp_path / "c.yaml"
    bad.write_text("cache: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_file_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"home: {tmp_path}\ncache:\n  batch_size: 3\n  layers: [0, 2]\n")
    cfg = load_config(path)
    assert cfg.cache.batch_size == 3 and cfg.cache.layers == (0, 2) and cfg.home == tmp_path


def test_version_is_deterministic_and_sensitive():
    base = artifact_version("cache", {"a": 1, "b": [1, 2]}, {"model": "m1"})
    assert base == artifact_version("cache", {"b": [1, 2], "a": 1}, {"model": "m1"})  # key order irrelevant
    assert base != artifact_version("cache", {"a": 2, "b": [1, 2]}, {"model": "m1"})  # config
    assert base != artifact_version("cache", {"a": 1, "b": [1, 2]}, {"model": "m2"})  # input version
    assert len(base) == 16
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        artifact_version("nope", {}, {})
