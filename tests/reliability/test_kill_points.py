"""Crash safety: SIGKILL the pipeline at 37 named points over all six stages, re-run, and get exactly the
artifacts and warehouse of an uninterrupted run.

Kill points are `maybe_kill("<point>")` calls in the product (loralens/killpoints.py): with
`LORALENS_KILL_AT="<point>:<n>"` the n-th hit SIGKILLs the whole process group (the CLI and its training
worker). Each stage has one chain of kills: starting from the uninterrupted reference home with that stage's
version removed (folder and warehouse rows; the other stages stay complete, as versions are content hashes),
`loralens run` is started and killed at the chain's first point, started again (resuming) and killed at the
next, and so on; a last run without a kill must then leave a home whose fingerprint (kill_helpers.py: every
artifact file's digest, every warehouse row) equals the reference's. Chaining kills resumes from every
intermediate state at the price of one process per point; runs are forked from a server that imported the
pipeline once (kill_helpers.ForkServer), which keeps the module at ~2.5 min on 2 busy cores. After every kill:
the state the point leaves (files present/absent, committed rows), no manifest unless the point is after it,
nothing a record or manifest lists fails its checksum, no `complete` registration, no duplicate rows, no
partial decode shard in DuckDB.

Compared as-is: every Parquet, safetensors, PNG, Markdown and perplexity file (byte-identical across runs).
Compared without wall-clock times, paths under the home and resume statistics (kill_helpers.VOLATILE_KEYS):
JSON records, manifests, summaries; `curve.jsonl` as its last record per step (an append log: a resumed
worker repeats the steps after its newest checkpoint, the warehouse keeps the last). Not compared:
`artifacts.created_at/completed_at`, the per-run `reports/`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
import yaml

from loralens.config import parse_config
from loralens.hashing import file_sha256
from loralens.tasks.chain import stage_chain
from loralens.tasks.registry import stage_names
from loralens.warehouse.artifacts import ArtifactDir

from .kill_helpers import ForkServer, artifact_fingerprint, drop_version, duplicate_rows, warehouse_fingerprint

SIGKILLED = -9
STAGES = stage_names()  # every registered stage has a chain of kill points below


def config(home: Path, model: Path) -> dict:
    """The pipeline on a tiny llama: 3 cache shards, 10 training steps (checkpoint every 2), 3 decode shards,
    6 intervene conditions in 9 generation batches (the head budget is 0 and the all-heads claim is off, so select
    preregisters no steering condition; the select chain still runs the steering search)."""
    return {"home": str(home), "model": {"name": str(model)}, "select": {"steering": {"all_heads": False}},
            "corpus": {"paths": ["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"], "max_prompts_per_file": 6},
            "cache": {"batch_size": 4, "prompts_per_shard": 4, "max_length": 16},
            "train": {"micro_batch_tokens": 32, "epochs": 2, "checkpoint_every": 2, "log_every": 1},
            "intervene": {"max_prompts": 4, "k": 2, "max_new_tokens": 4, "batch_prompts": 2,
                          "head_sets": [{"top_n": 1}], "random_seeds": [0], "ablation_candidates": 2,
                          "ablation_prompts": 2, "ppl_tokens": 200, "ppl_window": 50, "n_boot": 50}}


@dataclass(frozen=True)
class Kill:
    point: str  # LORALENS_KILL_AT value: "<point>:<n>", n-th hit in that run
    leaves: str  # the state the kill leaves behind, checked by the fields below
    manifest: bool = False  # whether the killed stage's manifest exists afterwards
    present: tuple[str, ...] = ()  # globs (relative to the stage's version folder) that must match
    absent: tuple[str, ...] = ()  # globs that must not match
    rows: tuple[tuple[str, int], ...] = ()  # (table, committed rows of the killed version)


D_SHARD = 4 * 12 * 2 * 10  # decodings of one shard: 4 last positions x 12 heads x 2 lenses x top-10

# One chain per stage, in the order a run meets the points; each run resumes from the previous kill's state.
CHAINS: dict[str, list[Kill]] = {
    "cache": [
        Kill("cache.after_record:1", "shard 0 recorded, shards 1-2 not",
             present=("_shards/shard-00000.json",), absent=("_shards/shard-00001.json", "_shards/shard-00002.json")),
        Kill("atomic_write.before_rename:3", "shard 1: prompts and tokens renamed, z/layer=0 only a .tmp- file",
             present=("tokens/shard-00001.parquet", "z/layer=0/.tmp-*"), absent=("_shards/shard-00001.json",)),
        Kill("cache.before_record:2", "shard 1 redone and recorded; shard 2's files complete but unrecorded",
             present=("_shards/shard-00001.json", "z/layer=2/shard-00002.parquet"),
             absent=("_shards/shard-00002.json",)),
        Kill("cache.before_manifest:1", "every shard recorded, no manifest", present=("_shards/shard-00002.json",)),
        Kill("cache.after_manifest:1", "manifest written; prompts rows and 'complete' registration missing",
             manifest=True, rows=(("prompts", 0),)),
        Kill("db.inserted.prompts:1", "the re-registration killed inside its DuckDB transaction", manifest=True,
             rows=(("prompts", 0),)),
    ],
    "train": [
        Kill("train.after_step:3", "worker at step 3, newest checkpoint step 2 (curve.jsonl has step 3)",
             present=("checkpoints/step-0000002/COMPLETE",), absent=("checkpoints/step-0000004",)),
        Kill("train.mid_checkpoint:2", "resumed at 2; the step-6 checkpoint written without its COMPLETE marker",
             present=("checkpoints/step-0000004/COMPLETE", "checkpoints/step-0000006/*"),
             absent=("checkpoints/step-0000006/COMPLETE",)),
        Kill("train.after_checkpoint:2", "resumed at 4 over the half-written step 6; checkpoint 8 complete",
             present=("checkpoints/step-0000008/COMPLETE",), absent=("checkpoints/step-0000010",)),
        Kill("train.mid_lens_save:1", "trained to step 10; the consolidated banks only in .tmp-lenses",
             present=(".tmp-lenses/layer=2/lens_bank.safetensors",), absent=("lenses", "result.json")),
        Kill("train.before_result:1", "lenses and fidelity.json written, no result.json",
             present=("lenses/layer=2/lens_bank.safetensors", "fidelity.json"), absent=("result.json",)),
        Kill("train.after_workers:1", "the worker finished (result.json), nothing registered",
             present=("result.json",), rows=(("training_curve", 0), ("lens_fidelity", 0))),
        Kill("db.inserted.training_curve:1", "curve rows inserted, fidelity not, transaction open",
             rows=(("training_curve", 0), ("lens_fidelity", 0))),
        Kill("train.before_manifest:1", "rows committed, heatmap and lens record written, no manifest",
             present=("_shards/shard-00000.json", "fidelity_heatmap.png"), rows=(("training_curve", 10),)),
        Kill("train.after_manifest:1", "manifest written; 'complete' registration and checkpoint removal missing",
             manifest=True, present=("checkpoints/step-0000010/COMPLETE",)),
    ],
    "decode": [
        # record 1 is the token toxicity file's (scored once, before the shards)
        Kill("decode.after_record:2", "token toxicity and shard 0's files and records, not in DuckDB",
             present=("token_toxicity.parquet", "_shards/shard-00000.json"), rows=(("decodings", 0),)),
        # a resumed run reads the token toxicity back; each shard writes its decodings, then its readouts
        Kill("atomic_write.before_rename:3", "shard 1 written and loaded; shard 2's decodings only a .tmp- file",
             present=("decodings/.tmp-*",), absent=("_shards/shard-00002.json", "readouts/shard-00002.parquet"),
             rows=(("decodings", D_SHARD),)),
        Kill("db.inserted.decodings:2", "shard 2 loaded; shard 0's insert killed inside its transaction",
             rows=(("decodings", 2 * D_SHARD),)),
        Kill("decode.before_manifest:1", "every shard in DuckDB, no manifest", rows=(("decodings", 3 * D_SHARD),)),
        Kill("decode.after_manifest:1", "manifest written, not registered complete", manifest=True),
    ],
    "attribute": [
        Kill("atomic_write.before_rename:2", "prompt_groups.parquet renamed, head_scores only a .tmp- file",
             present=("prompt_groups.parquet", ".tmp-*head_scores.parquet"), absent=("head_scores.parquet",)),
        Kill("attribute.before_record:1", "all files, heatmaps and the report written, no record",
             present=("head_scores.parquet", "top_heads.md"), absent=("_shards/shard-00000.json",)),
        Kill("db.inserted.prompt_groups:1", "vocab + groups inserted, head_scores not, transaction open",
             present=("_shards/shard-00000.json",), rows=(("vocab_toxicity", 0), ("prompt_groups", 0))),
        Kill("attribute.before_manifest:1", "rows committed, no manifest", rows=(("head_scores", 5 * 12),)),
        Kill("attribute.after_manifest:1", "manifest written, not registered complete", manifest=True),
    ],
    "select": [
        Kill("select.before_record:1", "scores, path, splits and report written, no record",
             present=("head_scores.parquet", "selection_path.parquet", "prompt_splits.parquet", "selection.md"),
             absent=("_shards/shard-00000.json",)),
        Kill("db.inserted.selection_path:1", "head scores + path inserted, splits not, transaction open",
             present=("_shards/shard-00000.json",), rows=(("head_scores", 0), ("selection_path", 0))),
        Kill("select.before_manifest:1", "rows committed, no manifest", rows=(("head_scores", 3 * 12),)),
        Kill("select.after_manifest:1", "manifest written, not registered complete", manifest=True),
    ],
    "intervene": [
        Kill("intervene.after_record:2", "baseline's 2 generation batches recorded, its perplexity not",
             present=("_shards/shard-00001.json",), absent=("perplexity",)),
        Kill("intervene.after_ppl:1", "baseline perplexity written, condition 1 not started",
             present=("perplexity/condition-0000.json",), absent=("generations/shard-100000.parquet",)),
        Kill("intervene.before_record:1", "mid-generation: condition 1 batch 0's file written, unrecorded",
             present=("generations/shard-100000.parquet",), absent=("_shards/shard-100000.json",)),
        Kill("atomic_write.before_rename:2", "condition 1 batch 0 redone; batch 1 only a .tmp- file",
             present=("_shards/shard-100000.json", "generations/.tmp-*"), absent=("_shards/shard-100001.json",)),
        Kill("intervene.after_record:4", "conditions 1-2 and the ablation baseline done; 2 ablations left",
             present=("_shards/shard-300000.json",), absent=("_shards/shard-400000.json",)),
        Kill("db.inserted.generations:1", "all batches done; generations inserted, interventions not",
             present=("_shards/shard-500000.json", "interventions.parquet"),
             rows=(("generations", 0), ("interventions", 0))),
        Kill("intervene.before_manifest:1", "rows committed, no manifest", rows=(("interventions", 6),)),
        Kill("intervene.after_manifest:1", "manifest written, not registered complete", manifest=True),
    ],
}


def test_at_least_twenty_points_over_all_stages():
    points = [k.point for chain in CHAINS.values() for k in chain]
    assert len(points) >= 20 and set(CHAINS) == set(STAGES)
    assert len({(stage, k.point) for stage, chain in CHAINS.items() for k in chain}) == len(points)


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(prefect_server):
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k != "LORALENS_KILL_AT"}
    # The shared test server (no start-up per run); one thread per process: 2 cores are shared with others.
    env |= {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    srv = ForkServer(env)
    yield srv
    srv.close()


def run_cli(server: ForkServer, cfg_file: Path, log: Path, kill: str | None = None) -> int:
    env = {"LORALENS_KILL_AT": kill} if kill else {}
    return server.run(["run", "--config", str(cfg_file)], env=env, log=log)


def versions(cfg: dict) -> dict[str, str]:
    return {s: p.version for s, p in stage_chain(parse_config(cfg), STAGES[-1]).items()}


@pytest.fixture(scope="module")
def reference(server, tiny_models, tmp_path_factory):
    """One uninterrupted run of the whole pipeline: its home, versions and fingerprint."""
    root = tmp_path_factory.mktemp("kill-reference")
    cfg = config(root / "home", tiny_models["llama"])
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    rc = run_cli(server, root / "cfg.yaml", root / "run.log")
    assert rc == 0, (root / "run.log").read_text()[-3000:]
    home = Path(cfg["home"])
    return {"home": home, "cfg": cfg, "versions": versions(cfg), "files": artifact_fingerprint(home),
            "tables": warehouse_fingerprint(home)}


# -- checks -----------------------------------------------------------------------------------------------------
def tmp_files(home: Path) -> list[str]:
    return [str(p.relative_to(home)) for p in (home / "artifacts").rglob(".tmp-*")]


def check_killed_state(home: Path, stage: str, version: str, kill: Kill) -> None:
    """What must hold after any kill: nothing incomplete is marked complete, nothing is in the warehouse twice."""
    adir = ArtifactDir(home, stage, version)
    where = f"after {kill.point} ({kill.leaves})"
    assert adir.is_complete() == kill.manifest, f"manifest {where}"
    for pattern in kill.present:
        assert list(adir.path.glob(pattern)), f"no {pattern} {where}"
    for pattern in kill.absent:
        assert not list(adir.path.glob(pattern)), f"{pattern} exists {where}"
    for index in adir.done_shards():  # a record is written only after its files, so each must verify
        assert adir.shard_files(index) is not None, f"shard {index} recorded but its files do not verify"
    for f in (adir.manifest() or {}).get("files", []):  # so must everything a manifest lists
        assert file_sha256(adir.path / f["path"]) == f["sha256"], f["path"]
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        status = con.execute("SELECT status FROM artifacts WHERE version = ?", [version]).fetchall()
        assert status in ([], [("running",)], [("failed",)]), f"{stage} registered {status} {where}"
        for table, n in kill.rows:
            got = con.execute(f"SELECT count(*) FROM {table} WHERE version = ?", [version]).fetchone()[0]
            assert got == n, f"{got} {table} rows {where}, expected {n}"
        if stage == "decode":  # a shard is in DuckDB entirely or not at all
            loaded = dict(con.execute("SELECT shard, count(*) FROM decodings WHERE version = ? GROUP BY shard",
                                      [version]).fetchall())
            records = {i: files[0].rows for i, files in adir.done_shards().items()}
            assert all(records.get(s) == n for s, n in loaded.items()), (loaded, records)
    assert duplicate_rows(home) == {"decodings": 0, "generations": 0}


def assert_same_as_reference(home: Path, reference: dict) -> None:
    files = artifact_fingerprint(home, reference["home"])  # kept upstream/downstream files name the reference
    ref_files = reference["files"]
    assert sorted(files) == sorted(ref_files), {"missing": sorted(set(ref_files) - set(files)),
                                                "extra": sorted(set(files) - set(ref_files))}
    assert [f for f in files if files[f] != ref_files[f]] == []
    rows = warehouse_fingerprint(home, reference["home"])
    assert sorted(rows) == sorted(reference["tables"])
    for table, ref_rows in reference["tables"].items():
        assert len(rows[table]) == len(ref_rows), table
        if rows[table] != ref_rows:
            got, want = set(rows[table]) - set(ref_rows), set(ref_rows) - set(rows[table])
            pytest.fail(f"{table} differs from the uninterrupted run:\n"
                        f" got  {sorted(got)[:3]}\n want {sorted(want)[:3]}")


# -- the test ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_chain_then_rerun_equals_uninterrupted(stage, server, reference, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(reference["home"], home, ignore=shutil.ignore_patterns("reports"))
    version = reference["versions"][stage]
    drop_version(home, stage, version)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({**reference["cfg"], "home": str(home)}))

    for i, kill in enumerate(CHAINS[stage]):
        log = tmp_path / f"kill-{i}.log"
        rc = run_cli(server, cfg_file, log, kill.point)
        assert rc == SIGKILLED, f"{kill.point} not reached (exit {rc}):\n{log.read_text()[-3000:]}"
        check_killed_state(home, stage, version, kill)

    log = tmp_path / "final.log"
    rc = run_cli(server, cfg_file, log)
    assert rc == 0, log.read_text()[-3000:]
    # Stages kept from the reference are reported (and their rows registered) under this home, not the reference's.
    assert str(reference["home"]) not in log.read_text()
    assert tmp_files(home) == []
    assert duplicate_rows(home) == {"decodings": 0, "generations": 0}
    assert_same_as_reference(home, reference)
