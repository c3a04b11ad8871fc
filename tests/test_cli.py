"""The `loralens` command line: one-line errors with exit code 2, status, and model errors."""

from __future__ import annotations

import pytest

from loralens.flows.cli import main
from loralens.lens.runtime.models import ModelLoadError, load_model


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

    from loralens.lens.runtime.adapters import UnsupportedArchitectureError

    folder = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(folder)
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'bert'; supported model types"):
        load_model(str(folder), tmp_path)


# -- a fast, quiet command line ----------------------------------------------------------------------------
def test_start_up_imports_nothing_heavy():
    """`loralens --help` (and the parser of every command) imports neither torch, Prefect nor pydantic."""
    import subprocess
    import sys

    code = ("import sys\nfrom loralens.flows.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'prefect', 'pydantic', 'transformers', 'duckdb', 'pyarrow') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_every_option_has_help_and_only_lists_the_stages():
    from loralens.flows.cli import build_parser
    from loralens.warehouse.constants import STAGES

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"run", "status", "verify", "sql", "inspect", "gc", "plan"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"loralens {name} {action.option_strings or action.dest} has no help text"
    only = next(a for a in commands["run"]._actions if a.dest == "only")
    assert all(stage in only.help for stage in STAGES)


def test_bad_command_line_is_one_line(capsys):
    assert main(["run", "--bogus"]) == 2
    assert capsys.readouterr().err == "loralens: error: unrecognized arguments: --bogus (see `loralens --help`)\n"
    assert main(["inspect", "L0H0", "--prompt", "x", "--k", "ten"]) == 2
    assert capsys.readouterr().err == ("loralens: error: argument --k: invalid int value: 'ten' "
                                       "(see `loralens inspect --help`)\n")


NEEDS = "inspect needs HEAD... and --prompt TEXT, or --mechanisms (see `loralens inspect --help`)"


@pytest.mark.parametrize(("argv", "message"), [
    ([], NEEDS), (["L0H0"], NEEDS), (["--prompt", "hi"], NEEDS),
    (["--mechanisms", "L0H0"], "--mechanisms reads every head on repeated random tokens: give no HEAD or --prompt "
                               "(see `loralens inspect --help`)"),
    (["--mechanisms", "--top", "0"], "argument --top: must be >= 1, got 0 (see `loralens inspect --help`)")])
def test_inspect_usage_errors_are_one_line(tmp_path, capsys, argv, message):
    """Checked before the home is opened: an empty folder gives the usage error, not 'no warehouse'."""
    assert main(["inspect", *argv, "--home", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"loralens: error: {message}\n" and captured.out == ""


def test_directory_as_prompt_file_or_config_says_so(tmp_path, capsys):
    folder = tmp_path / "prompts"
    folder.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(f"corpus:\n  paths: [{folder}]\n")
    assert main(["run", "--config", str(config), "--home", str(tmp_path / "home")]) == 2
    assert capsys.readouterr().err == (f"loralens: error: prompt file {folder} is a directory, not a file (list "
                                       "the files inside it instead)\n")
    assert main(["run", "--config", str(folder), "--home", str(tmp_path / "home")]) == 2
    assert capsys.readouterr().err == f"loralens: error: config error: {folder} is a directory, not a config file\n"
    assert not (tmp_path / "home").exists()


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    from loralens.config import load_config
    from loralens.warehouse.corpus import load_corpus

    bom = b"\xef\xbb\xbf"
    jsonl, txt, config = tmp_path / "p.jsonl", tmp_path / "q.txt", tmp_path / "c.yaml"
    jsonl.write_bytes(bom + b'{"id": "a", "text": "caf\xc3\xa9 au lait", "toxicity": 0.2}\n{"text": "second"}\n')
    txt.write_bytes(bom + b"first line\r\nsecond line\r\n")
    config.write_bytes(bom + b"cache:\n  batch_size: 3\n")
    corpus = load_corpus([str(jsonl), str(txt)])
    assert [p.text for p in corpus.prompts] == ["café au lait", "second", "first line", "second line"]
    assert corpus.prompts[0].id == "p/a" and corpus.prompts[0].toxicity == 0.2
    assert load_config(config).cache.batch_size == 3


def test_user_error_inside_a_flow_is_one_line_and_stays_in_the_flow_run_log(prefect_server, tiny_models, tmp_path):
    """Prefect's own lines about the failure (traceback, 'Finished in state Failed') stay off the terminal and in
    the flow run's log. A home under a regular file: found only when the stage writes (the checks before the flow
    run write nothing, tests/test_preflight.py)."""
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL

    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  name: {tiny_models['llama']}\ncorpus:\n  max_prompts_per_file: 4\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    env = os.environ | {"PREFECT_API_URL": str(PREFECT_API_URL.value())}  # reuse the test server: no start-up
    proc = subprocess.run([sys.executable, "-m", "loralens.flows.cli", "run", "--config", str(config), "--only",
                           "cache", "--home", str(blocker / "home")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith("INFO ")]  # progress: the flow run started, its URL
    assert len(errors) == 1 and errors[0].startswith("loralens: error: cannot write artifact folder"), proc.stderr
    assert not any("Failed" in ln or "Traceback" in ln for ln in lines), proc.stderr
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort="START_TIME_DESC", limit=1)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[0].id])))
    assert runs[0].state.is_failed()
    assert any("cannot write artifact folder" in log.message and "Finished in state Failed" in log.message
               for log in logs), [log.message for log in logs]


def test_a_user_error_inside_a_flow_is_the_last_line_after_a_temporary_server(tiny_models, tmp_path):
    """No Prefect server configured: the run starts a temporary one; the error still comes last, after it stopped."""
    import os
    import subprocess
    import sys

    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  name: {tiny_models['llama']}\ncorpus:\n  max_prompts_per_file: 4\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "ph")}
    proc = subprocess.run([sys.executable, "-m", "loralens.flows.cli", "run", "--config", str(config), "--only",
                           "cache", "--home", str(blocker / "home")], capture_output=True, text=True, env=env,
                          timeout=180)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("loralens: error: cannot write artifact folder"), proc.stderr
    assert not any("Stopping temporary server" in ln for ln in lines), proc.stderr


def test_a_user_error_leaves_running_a_server_the_command_did_not_start(prefect_server, tiny_models, tmp_path):
    """In process, under the test harness's server: the error path stops only a server the command started."""
    from prefect.client.orchestration import get_client

    from loralens.flows.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  name: {tiny_models['llama']}\ncorpus:\n  max_prompts_per_file: 4\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    assert main(["run", "--config", str(config), "--only", "cache", "--home", str(blocker / "home")]) == 2
    with get_client(sync_client=True) as client:
        assert client.api_healthcheck() is None  # None: the server answers
