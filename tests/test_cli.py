"""The `loralens` command line: one-line errors with exit code 2, status, and model errors."""

from __future__ import annotations

import pytest

from loralens.flows.cli import main
from loralens.lens.models import ModelLoadError, load_model


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("cache:\n  batch_sise: 4\n", "config error: unknown key 'cache.batch_sise'"),
        ("train:\n  zero_stage: 5\n", "config error: train.zero_stage:"),
        ("corpus:\n  paths: []\n", "config error: corpus.paths: Value error, must list at least one prompt file"),
        ("model: [1, 2]\n", "config error: model:"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    assert main(["run", "--config", str(path), "--home", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"loralens: error: {message}") and err.count("\n") == 1


def test_workers_must_be_positive(tmp_path, capsys):
    assert main(["run", "--workers", "0", "--home", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "loralens: error: --workers: must be >= 1, got 0\n"
    assert not (tmp_path / "warehouse.duckdb").exists()


def test_relative_home_is_made_absolute(tmp_path, monkeypatch):
    from loralens.config import parse_config

    monkeypatch.chdir(tmp_path)
    assert parse_config({"home": "proj/../here"}).home == tmp_path.resolve() / "here"


def test_status_lists_artifacts_or_says_none(tmp_path, capsys):
    assert main(["status", "--home", str(tmp_path)]) == 0
    assert "no artifacts" in capsys.readouterr().out
    (tmp_path / "artifacts" / "cache" / "abc123").mkdir(parents=True)
    assert main(["status", "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cache" in out and "abc123" in out and "incomplete (0 shards done)" in out


def test_unknown_model_and_folder_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-org/no-such-model': not an embedded alias"):
        load_model("no-such-org/no-such-model", tmp_path)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path), tmp_path)
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(str(tmp_path / "missing"), tmp_path)


def test_unsupported_architecture_fails_before_loading_weights(tmp_path):
    import transformers

    from loralens.lens.adapters import UnsupportedArchitectureError

    folder = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(folder)
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'bert'; supported model types"):
        load_model(str(folder), tmp_path)
