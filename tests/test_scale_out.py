"""Scale-out on Dask: cache shards, decode shards and generation units as mapped Prefect tasks on a real 2-process
`distributed.LocalCluster` (prefect-dask's DaskTaskRunner), equal to one process row for row, a SIGKILLed worker's
unit redone elsewhere, a dead scheduler address a one-line error, the warehouse written by the flow only, and the
memory check of a local cluster counting every worker's model copy."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import duckdb
import pytest

from tests.test_intervene import config

DECODINGS = "SELECT * EXCLUDE (version) FROM decodings WHERE version = '{v}' ORDER BY ALL"
READOUTS = "SELECT * FROM read_parquet('{p}/readouts/*.parquet') ORDER BY ALL"
HEAD_SCORES = "SELECT * EXCLUDE (version) FROM head_scores WHERE version = '{v}' ORDER BY ALL"
SKIP = ("seconds", "cached", "run_report", "path")  # of a stage summary: where and when, not what
GENERATIONS = ("SELECT condition, prompt_idx, sample, seed, text, toxicity FROM generations "
               "WHERE version = '{v}' ORDER BY condition, prompt_idx, sample")
METRICS = "SELECT condition, emt, emt_low, emt_high, ppl FROM interventions WHERE version = '{v}' ORDER BY 1"


def rows(home: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def cache_files(res: dict, stage: str = "cache") -> list[tuple[str, str]]:
    manifest = json.loads((Path(res[stage]["path"]) / "manifest.json").read_text())
    return sorted((f["path"], f["sha256"]) for f in manifest["files"])


def worker_calls(cluster, fn) -> list:
    from distributed import Client

    with Client(cluster.scheduler_address, timeout="10s") as client:
        return list(client.run(fn).values())


def model_loads(what: str = "model") -> int:
    from loralens.tasks.workers import worker_process

    return worker_process.loads[what]


def reader_loads() -> int:
    return model_loads("reader")


def holds_model() -> bool:
    from loralens.tasks.workers import worker_process

    return worker_process._state["model"] is not None


def test_cache_on_two_worker_processes_equals_one_process(tiny_pipeline, dask_cluster, tmp_path):
    """Cache shards mapped over 2 Dask worker processes give one process's files byte for byte (so decode, which
    reads them, gives the same rows too); a worker loads the model once for all the shards it caches, and drops it
    once the units are done (the finalizing task loads the model in the flow process, on the GPU of a GPU run)."""
    from loralens.flows.pipeline import pipeline

    cfg, want = tiny_pipeline
    home = tmp_path / "home"
    before = worker_calls(dask_cluster, model_loads)
    got = pipeline(config={**cfg, "home": str(home)}, only="cache", dask_address=dask_cluster.scheduler_address)
    after = worker_calls(dask_cluster, model_loads)
    assert not got["cache"]["cached"] and got["cache"]["version"] == want["cache"]["version"]
    assert cache_files(got) == cache_files(want)
    n_shards = len(list((home / "artifacts" / "cache" / want["cache"]["version"] / "_shards").glob("*.json")))
    loaded = [b - a for a, b in zip(before, after, strict=True)]
    assert n_shards > len(loaded) and all(n <= 1 for n in loaded)  # 3 shards, 2 workers: one reused its model
    assert sum(loaded) >= 1 and worker_calls(dask_cluster, holds_model) == [False, False]
    version = want["cache"]["version"]
    prompts = f"SELECT * EXCLUDE (version) FROM prompts WHERE version = '{version}' ORDER BY ALL"
    assert rows(home, prompts) == rows(Path(cfg["home"]), prompts)  # registered by the flow process


def test_decode_on_two_worker_processes_equals_one_process(tiny_pipeline, dask_cluster, tmp_path):
    """Decode shards mapped over 2 Dask worker processes (the vocabulary scored once, in the flow process, before
    the split) give one process's files byte for byte and its decodings, readouts and, downstream, head scores row
    for row; the workers decode every shard (each loads the lenses at most once), the flow process none, and the
    warehouse, empty before, is filled by the flow process (the workers refuse writes)."""
    from loralens.config import parse_config
    from loralens.flows.pipeline import pipeline
    from loralens.tasks.chain import stage_chain
    from loralens.tasks.stages.decode import run_decode_stage
    from loralens.tasks.workers import worker_process
    from loralens.warehouse.artifacts import ArtifactError

    cfg, want = tiny_pipeline
    home = tmp_path / "home"
    shutil.copytree(Path(cfg["home"]) / "artifacts", home / "artifacts")  # cache and train; no warehouse
    decode, attribute = want["decode"]["version"], want["attribute"]["version"]
    shutil.rmtree(home / "artifacts" / "decode" / decode)
    shutil.rmtree(home / "artifacts" / "attribute" / attribute)
    cfg = {**cfg, "home": str(home)}
    chain = stage_chain(parse_config(cfg), "decode")
    with pytest.raises(ArtifactError, match="no token toxicity file"):  # a worker never scores the vocabulary
        run_decode_stage(parse_config(cfg), chain["decode"], chain["train"], chain["cache"], only_units=[0])

    before, here = worker_calls(dask_cluster, reader_loads), worker_process.loads["reader"]
    got = pipeline(config=cfg, only="decode", dask_address=dask_cluster.scheduler_address)
    after = worker_calls(dask_cluster, reader_loads)
    assert not got["decode"]["cached"] and got["decode"]["version"] == decode
    loaded = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(loaded) >= 1 and all(n <= 1 for n in loaded) and worker_process.loads["reader"] == here
    assert cache_files(got, "decode") == cache_files(want, "decode")  # token toxicity and every shard's files
    assert {k: v for k, v in got["decode"].items() if k not in SKIP} == {
        k: v for k, v in want["decode"].items() if k not in SKIP}
    ref = Path(tiny_pipeline[0]["home"])
    assert rows(home, DECODINGS.format(v=decode)) == rows(ref, DECODINGS.format(v=decode))
    assert rows(home, READOUTS.format(p=got["decode"]["path"])) == rows(ref, READOUTS.format(p=want["decode"]["path"]))
    got = pipeline(config=cfg, only="attribute")
    assert got["attribute"]["version"] == attribute
    assert rows(home, HEAD_SCORES.format(v=attribute)) == rows(ref, HEAD_SCORES.format(v=attribute))


def test_workers_never_write_the_warehouse(dask_cluster, tmp_path):
    """Every Dask worker process refuses warehouse writes (the runs above completed, so none was attempted)."""

    def try_write(path: str = str(tmp_path / "warehouse.duckdb")) -> str:
        from loralens.warehouse.db import WarehouseWriteForbidden, connect

        try:
            with connect(Path(path)):
                return "wrote"
        except WarehouseWriteForbidden as err:
            return str(err)

    from loralens.flows.common import scale_out

    with scale_out(dask_address=dask_cluster.scheduler_address):  # registers the plugin on the workers
        pass
    answers = worker_calls(dask_cluster, try_write)
    assert len(answers) == 2 and all("only the flow process writes DuckDB" in a for a in answers)
    assert not (tmp_path / "warehouse.duckdb").exists()


def test_worker_sigkilled_mid_unit_is_redone_and_the_run_equals(tiny_pipeline, dask_cluster, tmp_path):
    """A worker process SIGKILLed between a generation batch's files and its record: Dask runs that unit again on
    a worker, the run completes, and generations and metrics equal the uninterrupted run."""
    from loralens.flows.intervene import intervene_heads

    cfg, want = tiny_pipeline
    home = tmp_path / "home"
    shutil.copytree(cfg["home"], home)
    version = want["intervene"]["version"]
    shutil.rmtree(home / "artifacts" / "intervene" / version)
    marker = tmp_path / "killed-once"
    env = {"LORALENS_KILL_AT": "intervene.before_record:2", "LORALENS_KILL_SCOPE": "process",
           "LORALENS_KILL_ONCE": str(marker)}
    pids = set(worker_calls(dask_cluster, os.getpid))
    worker_calls(dask_cluster, lambda: os.environ.update(env))
    try:
        got = intervene_heads(config={**cfg, "home": str(home)}, dask_address=dask_cluster.scheduler_address)
    finally:
        worker_calls(dask_cluster, lambda: [os.environ.pop(k, None) for k in env])
    assert marker.exists() and set(worker_calls(dask_cluster, os.getpid)) != pids  # one worker died (restarted)
    assert not got["cached"] and got["version"] == version
    for sql in (GENERATIONS, METRICS):
        assert rows(home, sql.format(v=version)) == rows(Path(cfg["home"]), sql.format(v=version))


def test_a_scheduler_that_does_not_answer_is_a_one_line_error(tiny_models, prefect_server, tmp_path, capsys):
    from loralens.flows.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(json.dumps(config(tmp_path / "home", tiny_models["llama"])))
    assert main(["run", "--config", str(cfg_file), "--dask-address", f"tcp://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err  # Prefect's own log lines may be in it too: the error is one line, no traceback
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("loralens")] == [
        f"loralens: error: run.dask_address: no Dask scheduler answers at tcp://127.0.0.1:{port} "
        f"(Timed out trying to connect to tcp://127.0.0.1:{port} after 5 s)"]
    assert main(["run", "--config", str(cfg_file), "--dask-address", "not an address"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "loralens: error: config error: run.dask_address: " in err


def test_run_section_chooses_the_runner_and_hashes_into_no_version(tiny_models, tmp_path):
    """`run.workers`/`run.dask_address` come from the config unless the flow's parameters say otherwise; they
    change no stage version (where units run never changes a result)."""
    from loralens.config import ConfigError, parse_config
    from loralens.flows.common import run_workers
    from loralens.tasks.stages.cache import cache_version

    base = {"home": str(tmp_path), "model": {"name": str(tiny_models["llama"])}}
    cfg = parse_config({**base, "run": {"workers": 3, "dask_address": "tcp://10.0.0.1:8786"}})
    assert run_workers(cfg, None, None) == (3, "tcp://10.0.0.1:8786")
    assert run_workers(cfg, 2, "") == (2, None)  # an empty address clears the config's
    assert run_workers(parse_config(base), None, "sched:8786") == (1, "sched:8786")
    assert cache_version(cfg).version == cache_version(parse_config(base)).version
    for bad, msg in (({"workers": 0}, "run.workers"), ({"dask_address": "tcp://nohost"}, "run.dask_address")):
        with pytest.raises(ConfigError, match=msg):
            parse_config({**base, "run": bad})
    with pytest.raises(ConfigError, match="run.workers"):
        run_workers(cfg, 0, None)


def test_local_cluster_memory_check_counts_every_workers_model(tiny_models, tmp_path, monkeypatch):
    """A split stage on a local cluster of N workers must fit N times one worker's peak (each holds a model copy),
    said in the one-line error; a stage that does not split, or workers on an existing scheduler, count one."""
    from types import SimpleNamespace

    from loralens.config import parse_config
    from loralens.flows.common import _POOL, local_cluster_workers, scale_out
    from loralens.lens.memory.stage_memory import MemoryBudgetError, gib
    from loralens.tasks.memory import ensure_fits, predict

    cfg = parse_config(config(tmp_path / "home", tiny_models["llama"]))
    for stage in ("cache", "decode", "intervene"):
        one = predict(cfg, stage).per_process
        monkeypatch.setenv("LORALENS_MEMORY_LIMIT", str(int(2.5 * one)))
        ensure_fits(cfg, stage)
        ensure_fits(cfg, stage, workers=2)
        with pytest.raises(MemoryBudgetError) as err:
            ensure_fits(cfg, stage, workers=3)
        assert str(err.value).startswith(
            f"{stage} stage will not fit in memory: predicted peak {gib(3 * one)} (3 local Dask workers x {gib(one)})")
        assert str(err.value).endswith(", or run.workers (now 3)") and "\n" not in str(err.value)
    monkeypatch.setenv("LORALENS_MEMORY_LIMIT", str(int(2.5 * predict(cfg, "attribute").per_process)))
    ensure_fits(cfg, "attribute", workers=3)  # runs in the flow process: one copy whatever the cluster
    assert local_cluster_workers(4) == 4
    with scale_out(workers=3):  # a local cluster (started only when a stage maps units: not here)
        assert local_cluster_workers(3) == 3
    token = _POOL.set(SimpleNamespace(address="tcp://10.0.0.1:8786", workers=1))
    try:
        assert local_cluster_workers(3) == 1  # workers on other machines: each checks itself
    finally:
        _POOL.reset(token)


def test_split_decode_too_big_for_the_local_cluster_refuses_before_writing(tiny_pipeline, tmp_path, monkeypatch):
    """decode with workers=2, where one process fits but two do not: the one-line error, before a cluster starts or
    a version folder is made."""
    from loralens.config import parse_config
    from loralens.flows.decode import decode_stage
    from loralens.lens.memory.stage_memory import MemoryBudgetError
    from loralens.tasks.memory import predict

    cfg, _want = tiny_pipeline
    home = tmp_path / "home"
    shutil.copytree(Path(cfg["home"]) / "artifacts", home / "artifacts")
    c = parse_config({**cfg, "home": str(home), "decode": {"top_k": 7}})  # a decode version not made yet
    existing = {p.name for p in (home / "artifacts" / "decode").iterdir()}
    monkeypatch.setenv("LORALENS_MEMORY_LIMIT", str(int(1.5 * predict(c, "decode").per_process)))
    with pytest.raises(MemoryBudgetError, match=r"\(2 local Dask workers x .*run\.workers \(now 2\)$"):
        decode_stage(c, workers=2)
    assert {p.name for p in (home / "artifacts" / "decode").iterdir()} == existing
