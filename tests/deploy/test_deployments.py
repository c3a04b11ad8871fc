"""prefect.yaml end to end: a real local Prefect server, the `loralens` process work pool, `prefect deploy --all`,
a worker, a deployed pipeline run on a tiny model, and a failed stage re-run with `prefect flow-run retry`.

The scenario (one flow run of `loralens-pipeline/nightly`):

1. attempt 1 computes cache, train, decode and attribute; as soon as the intervene stage starts (its artifact
   folder appears) this test takes the DuckDB warehouse's write lock, so intervene fails with "locked by another
   writer" (the worker's `LORALENS_LOCK_WAIT_S=1` makes it give up after 1 s) and the flow run is Failed;
2. the lock is released and `prefect flow-run retry <id>` schedules the same flow run again; the worker runs it:
   the four upstream stages are Prefect cache hits (task runs in state "Cached", bodies skipped, summaries
   `cached: true`), intervene resumes its artifact folder and completes, the flow run is Completed;
3. the stage deployment `intervene-heads/intervene` with `force=true` redoes that one stage alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import duckdb
import pytest
import yaml

from loralens.flows.common import load_entry
from loralens.tasks.registry import REGISTRY, stage_names

STAGES = stage_names()
REPO = Path(__file__).resolve().parents[2]
PREFECT = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
# The pipeline's deployment and one per registered stage, named <flow name>/<stage>.
DEPLOYMENTS = {"loralens-pipeline/nightly"} | {f"{load_entry(s.flow).name}/{s.name}" for s in REGISTRY}
RUN_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(PREFECT is None, reason="the `prefect` command line is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"(no {path.name})"


class Stack:
    """A local Prefect server, the deployments of prefect.yaml and one process worker, all in a temp folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # never the user's profile
        env.update({
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
            "PREFECT_API_URL": self.api_url,
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # the worker polls every second (default 10 s)
            "LORALENS_LOCK_WAIT_S": "1",  # a locked warehouse fails the stage after 1 s (default 30 s)
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "COLUMNS": "200",  # Rich wraps CLI output at the terminal width
        })
        self.env = env
        self.server_log = root / "server.log"
        self.worker_log = root / "worker.log"
        self.procs: list[subprocess.Popen] = []
        # No scheduler service: the nightly cron must not create runs while the test runs (e.g. at 02:00 UTC).
        self.server = self.spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-scheduler", "--no-ui"], self.server_log)
        self.wait_healthy()

    def spawn(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait_healthy(self, timeout: float = 90) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.server.poll() is None, f"prefect server exited:\n{tail(self.server_log)}"
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"prefect server not healthy after {timeout} s:\n{tail(self.server_log)}")

    def cli(self, *args: str, timeout: float = 120) -> str:
        """Run `prefect --no-prompt ARGS` from the repository root; return its output (fail on a non-zero exit)."""
        # `{{ $PWD }}` in prefect.yaml reads the PWD variable, which only a shell's `cd` sets.
        env = {**self.env, "PWD": str(REPO)}
        res = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=timeout)
        out = res.stdout + res.stderr
        assert res.returncode == 0, f"prefect {' '.join(args)} exited {res.returncode}:\n{out[-4000:]}"
        return out

    def start_worker(self) -> None:
        self.worker = self.spawn([PREFECT, "worker", "start", "--pool", "loralens", "--name", "loralens-test"],
                                 self.worker_log)

    def client(self):
        """A synchronous client of this server (whatever API the test session's settings point at)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def run_deployment(self, name: str, **params) -> UUID:
        args = [f"{k}={json.dumps(v)}" for k, v in params.items()]
        out = self.cli("deployment", "run", name, *[a for p in args for a in ("-p", p)])
        match = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert match, out
        return UUID(match.group(1))

    def wait(self, flow_run_id: UUID, *, after_state: UUID | None = None, poll=None, timeout: float = RUN_TIMEOUT_S):
        """Poll until the flow run is in a final state other than `after_state`; call `poll()` in between."""
        deadline = time.monotonic() + timeout
        next_read = 0.0
        with self.client() as client:
            while time.monotonic() < deadline:
                if poll is not None:
                    poll()
                if time.monotonic() >= next_read:
                    run = client.read_flow_run(flow_run_id)
                    if run.state and run.state.is_final() and run.state.id != after_state:
                        return run
                    next_read = time.monotonic() + 0.5
                assert self.worker.poll() is None, f"the worker exited:\n{tail(self.worker_log)}"
                time.sleep(0.02)
        raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s; worker log:\n"
                             f"{tail(self.worker_log)}")

    def task_runs(self, flow_run_id: UUID) -> dict[int, dict[str, str]]:
        """Return {flow-run attempt: {task name: state name}} of one flow run."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with self.client() as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        attempts: dict[int, dict[str, str]] = {}
        for tr in runs:
            attempts.setdefault(tr.flow_run_run_count, {})[tr.name.rsplit("-", 1)[0]] = tr.state.name
        return attempts

    def artifacts(self, flow_run_id: UUID) -> dict[str, str]:
        """Return {key: type} of the Prefect artifacts created by one flow run."""
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with self.client() as client:
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        return {a.key: a.type for a in arts if a.key}

    def close(self) -> None:
        import psutil

        for proc in reversed(self.procs):  # worker first (with the flow-run processes it started), then server
            family = []
            try:
                family = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            if proc.poll() is None:
                # The server stops on SIGINT; a Prefect 3.9 worker idles on after its first SIGINT (a second
                # one makes it SIGKILL itself), so it gets a short grace period and then SIGKILL.
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=15 if proc is self.server else 3)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)
            for child in family:  # flow-run processes run in their own session
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass


def tiny_config(home: Path, model: Path) -> dict:
    """tests/test_intervene.py's config, shrunk: 8 prompts, 2 head sets of one head, 2 samples each."""
    return {"home": str(home), "model": {"name": str(model)},
            "corpus": {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"], "max_prompts_per_file": 4},
            "cache": {"batch_size": 4, "prompts_per_shard": 4, "max_length": 16},
            "train": {"micro_batch_tokens": 32, "epochs": 1},
            "intervene": {"max_prompts": 4, "k": 2, "max_new_tokens": 4, "ppl_tokens": 100, "ppl_window": 50,
                          "n_boot": 20, "batch_prompts": 2, "head_sets": [{"top_n": 1}], "random_seeds": [0],
                          "ablation_candidates": 1, "ablation_prompts": 2}}


def check_manifest(adir: Path) -> None:
    """The version folder holds a manifest written last whose every file exists with its size and sha256."""
    manifest = json.loads((adir / "manifest.json").read_text())
    assert manifest["stage"] == adir.parent.name and manifest["version"] == adir.name
    assert manifest["files"], adir
    for f in manifest["files"]:
        data = (adir / f["path"]).read_bytes()
        assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"], f"{adir}/{f['path']}"


def rows(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("prefect-deploy"))
    try:
        s.cli("work-pool", "create", "loralens", "--type", "process")
        s.cli("deploy", "--all", timeout=300)
        s.start_worker()
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def config_file(stack, tiny_tokenizer):
    from conftest import save_tiny_model

    model = save_tiny_model("llama", stack.root / "model", tiny_tokenizer)
    path = stack.root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(stack.root / "home", model)))
    return path


def test_deployments_from_prefect_yaml(stack):
    with stack.client() as client:
        pool = client.read_work_pool("loralens")
        deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
    assert pool.type == "process"
    assert set(deployments) == DEPLOYMENTS
    for d in deployments.values():
        assert d.work_pool_name == "loralens" and d.parameters["config_path"] is None
        step = d.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
        assert Path(step["directory"]) == REPO
        assert d.job_variables["env"]["DO_NOT_TRACK"] == "1"
    nightly = deployments["loralens-pipeline/nightly"]
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [("0 2 * * *", "UTC", True)]
    assert all(not d.schedules for name, d in deployments.items() if name != "loralens-pipeline/nightly")


def test_pipeline_run_fails_at_intervene_and_retry_reruns_only_that_stage(stack, config_file):
    home = Path(yaml.safe_load(config_file.read_text())["home"])
    db = home / "warehouse.duckdb"
    intervene_dir = home / "artifacts" / "intervene"
    held: list[duckdb.DuckDBPyConnection] = []

    def hold_lock_once_intervene_starts() -> None:
        if held or not intervene_dir.is_dir() or not any(intervene_dir.iterdir()):
            return
        try:
            held.append(duckdb.connect(str(db)))  # the one writer DuckDB allows: the run's next write fails
        except duckdb.IOException:
            pass  # the stage is writing right now; take it on the next poll

    t0 = time.monotonic()
    flow_run_id = stack.run_deployment("loralens-pipeline/nightly", config_path=str(config_file))
    try:
        failed = stack.wait(flow_run_id, poll=hold_lock_once_intervene_starts)
    finally:
        for con in held:
            con.close()
    t_failed = time.monotonic() - t0
    assert held, "the lock was never taken: the intervene stage did not start"
    assert failed.state.is_failed(), f"expected the locked run to fail, got {failed.state!r}"
    assert "locked by another writer" in (failed.state.message or ""), failed.state.message
    first = stack.task_runs(flow_run_id)[1]
    before = STAGES[:STAGES.index("intervene")]
    assert first == {**{stage: "Completed" for stage in before}, "intervene": "Failed"}
    assert not (intervene_dir / next(intervene_dir.iterdir()).name / "manifest.json").exists()

    stack.cli("flow-run", "retry", str(flow_run_id))
    done = stack.wait(flow_run_id, after_state=failed.state.id)
    t_retry = time.monotonic() - t0 - t_failed
    assert done.state.is_completed(), f"{done.state!r}\n{tail(stack.worker_log)}"
    assert done.run_count == 2
    attempts = stack.task_runs(flow_run_id)
    assert attempts[2] == {**{stage: "Cached" for stage in before}, "intervene": "Completed"}, attempts
    result = done.state.result()  # the flow's return value, persisted by the worker's flow-run process
    assert {stage: result[stage]["cached"] for stage in STAGES} == {**{stage: True for stage in before},
                                                                   "intervene": False}

    # Artifacts: one complete version per stage, the warehouse registers them, the tables have rows.
    for stage in STAGES:
        versions = list((home / "artifacts" / stage).iterdir())
        assert [v.name for v in versions] == [result[stage]["version"]], stage
        check_manifest(versions[0])
    registered = dict(rows(db, "SELECT stage, version FROM artifacts WHERE status = 'complete'"))
    assert registered == {stage: result[stage]["version"] for stage in STAGES}
    attribute_v, intervene_v = result["attribute"]["version"], result["intervene"]["version"]
    assert rows(db, f"SELECT count(*) FROM head_scores WHERE version = '{attribute_v}'")[0][0] > 0
    conditions = [r[0] for r in rows(db, f"SELECT condition FROM interventions WHERE version = '{intervene_v}'")]
    assert "baseline" in conditions and "top1:lens_contrast" in conditions
    assert rows(db, "SELECT count(*) FROM generations")[0][0] == result["intervene"]["generations"] > 0

    # Prefect artifacts attached to the flow run: every stage's summary table and the reports.
    arts = stack.artifacts(flow_run_id)
    assert {f"{s}-summary": "table" for s in STAGES}.items() <= arts.items()
    assert {"lens-fidelity": "markdown", "top-toxic-heads": "markdown", "interventions": "markdown"}.items() \
        <= arts.items()
    print(f"\ndeployed pipeline: first attempt failed after {t_failed:.0f} s, retry completed in {t_retry:.0f} s")

    # One stage on its own through its deployment: only the intervene task runs, redone (force), same version.
    t1 = time.monotonic()
    stage_run_id = stack.run_deployment("intervene-heads/intervene", config_path=str(config_file), force=True)
    stage_run = stack.wait(stage_run_id)
    assert stage_run.state.is_completed(), f"{stage_run.state!r}\n{tail(stack.worker_log)}"
    assert stack.task_runs(stage_run_id) == {1: {"intervene": "Completed"}}
    redo = stage_run.state.result()
    assert redo["version"] == intervene_v and redo["cached"] is False
    assert sorted(r[0] for r in rows(db, "SELECT condition FROM interventions")) == sorted(conditions)
    assert "interventions" in stack.artifacts(stage_run_id)
    print(f"stage deployment intervene-heads/intervene (force) completed in {time.monotonic() - t1:.0f} s")
