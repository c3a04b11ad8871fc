"""The `train` stage: launch DeepSpeed lens training over the cache, then register lenses and fidelity."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import task

from loralens.config import ConfigError, PipelineConfig, TrainConfig
from loralens.hashing import file_sha256
from loralens.killpoints import maybe_kill
from loralens.lens.memory.stage_memory import gib
from loralens.lens.runtime.devices import visible_gpus
from loralens.lens.training.deepspeed_loop import STOP_EXIT_CODE, free_port
from loralens.tasks.lens_loading import cached_layers
from loralens.tasks.memory import ensure_fits, predict
from loralens.tasks.report import fidelity_heatmap
from loralens.tasks.stage_versions import (
    StageVersion,
    keeps_old_version,
    register,
    register_complete,
    replaced_path,
    require_complete,
    reset_for_force,
    reuse_complete,
    science_config,
)
from loralens.warehouse.artifacts import ShardFile
from loralens.warehouse.constants import (
    CHECKPOINTS_DIR,
    FIDELITY_HEATMAP,
    LENSES_DIR,
    TRAIN_CURVE,
    TRAIN_FIDELITY,
    TRAIN_RESULT,
    TRAIN_SPEC,
)
from loralens.warehouse.db import warehouse_path
from loralens.warehouse.lens_tables import curve_table, fidelity_table, store_training_results
from loralens.warehouse.versions import artifact_version

log = logging.getLogger("loralens.train")
STAGE = "train"
WORKER_MODULE = "loralens.tasks.workers.train_worker"


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM after writing a checkpoint; running the stage again resumes it."""


def hostfile_world_size(path: str) -> int:
    """Return the processes a DeepSpeed hostfile starts: the sum of its `slots=N` (one line per host, `#` comments).

    Raises a one-line ConfigError naming the file when it is missing or a host line has no `slots=`.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"config error: train.hostfile: cannot read {path} ({err.strerror})") from None
    total = 0
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        slots = [p.split("=", 1)[1] for p in line.split()[1:] if p.startswith("slots=")]
        if len(slots) != 1 or not slots[0].isdigit() or int(slots[0]) < 1:
            raise ConfigError(f"config error: train.hostfile: {path} line {n}: expected 'HOST slots=N', got {line!r}")
        total += int(slots[0])
    if total == 0:
        raise ConfigError(f"config error: train.hostfile: {path} names no host")
    return total


# Science settings added after train versions existed, hashed only away from the default that reproduces the
# training from before them: every earlier version stays valid (its hashed config did not have the key).
HASHED_UNLESS_DEFAULT = {"grad_accum_steps": 1}


def train_version(cfg: PipelineConfig, cache_ver: StageVersion) -> StageVersion:
    """Return the train stage's version: a hash of the train science settings and the cache version.

    A hostfile run hashes the world size its hostfile starts (the launcher's, not `train.world_size`); the settings
    of `HASHED_UNLESS_DEFAULT` are hashed only when they differ from that default."""
    config = science_config(cfg, STAGE)
    for name, default in HASHED_UNLESS_DEFAULT.items():
        if config["train"][name] == default:
            del config["train"][name]
    if cfg.train.hostfile:
        config["train"]["world_size"] = hostfile_world_size(cfg.train.hostfile)
    inputs = {"cache": cache_ver.version}
    return StageVersion(STAGE, artifact_version(STAGE, config, inputs), config, inputs, cfg.home)


def launch_command(spec_path: Path, t: TrainConfig) -> list[str]:
    """Return the command that starts the training processes (plain, torchrun or deepspeed launcher)."""
    if t.hostfile or t.launcher == "deepspeed":
        exe = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        where = ["--hostfile", t.hostfile] if t.hostfile else ["--num_gpus", str(t.world_size)]
        return [exe, *where, "--master_port", str(free_port()), "--module", WORKER_MODULE, str(spec_path)]
    if t.world_size > 1 or t.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={t.world_size}",
                "-m", WORKER_MODULE, str(spec_path)]
    return [sys.executable, "-m", WORKER_MODULE, str(spec_path)]


def _die_with_parent() -> None:
    # If the task's process dies (killed worker, cancelled flow), training gets SIGTERM and checkpoints.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def training_devices(device: str, world_size: int, visible: str | None) -> tuple[dict[str, str], str]:
    """Return (environment for the training processes, the device they are told) for `model.device`.

    `cuda:N` pins GPU N (of `CUDA_VISIBLE_DEVICES` = `visible`, if set): the processes see that GPU alone and use
    plain `cuda`, so DeepSpeed (which places the module on `LOCAL_RANK`'s GPU) and the batches agree. Several
    ranks need one GPU each: `cuda:N` with world_size > 1 is a one-line config error.
    """
    if not device.startswith("cuda:"):
        return {}, device
    if world_size > 1:
        raise ConfigError(f"config error: model.device: {device} pins one GPU, but train.world_size is "
                          f"{world_size} (one GPU per process): use 'cuda' and CUDA_VISIBLE_DEVICES")
    index = int(device.split(":")[1])
    gpus = visible_gpus(visible, index + 1)
    if index >= len(gpus):
        raise ConfigError(f"config error: model.device: {device}, but CUDA_VISIBLE_DEVICES={visible} has "
                          f"{len(gpus)} GPU(s)")
    return {"CUDA_VISIBLE_DEVICES": gpus[index]}, "cuda"


# What ranks on other nodes of a hostfile run need from this environment: the deepspeed launcher forwards only a
# few prefixes itself (PYTHON*, NCCL/CUDA per accelerator, ...), and everything else reaches them only through
# its DS_ENV_FILE.
FORWARDED_ENV = ("HF_", "LORALENS_", "TRANSFORMERS_", "TORCH_", "NCCL_", "OMP_NUM_THREADS", "MALLOC_", "PREFECT_HOME")


def deepspeed_env(environ: dict[str, str]) -> str:
    """Return the DS_ENV_FILE text (`KEY=value` lines, sorted) forwarding `FORWARDED_ENV` variables to every node."""
    keep = {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV) and "\n" not in v}
    return "".join(f"{k}={v}\n" for k, v in sorted(keep.items()))


def run_training_processes(spec_path: Path, t: TrainConfig, env_updates: dict[str, str] | None = None) -> int:
    """Run the training processes to completion; return their exit code."""
    env = dict(os.environ) | (env_updates or {})
    # Each loss chunk allocates and frees [chunk, vocab] buffers; above glibc's default mmap threshold
    # every one is a fresh mmap + page faults. Keeping them on the heap measured +15-30% tokens/s on CPU.
    # Buffers of 64 MiB and more (a [chunk, vocab] block of a 128k vocabulary) still get their own mmap, returned
    # on free: on the heap their fragments grew a Llama-3-8B-sized rank by ~0.5 GB per step.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(256 << 20))
    if t.world_size > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // t.world_size)))
    if t.hostfile:  # an absolute DS_ENV_FILE: the launcher reads it whatever its working directory
        env_file = spec_path.parent / "deepspeed_env"
        env_file.write_text(deepspeed_env(env))
        env["DS_ENV_FILE"] = str(env_file)
    cmd = launch_command(spec_path, t)
    log.info("launching training: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()  # forward our own interruption so the workers checkpoint
        proc.wait()
        raise


def _lens_files(out: Path) -> list[ShardFile]:
    files = sorted(p for p in (out / LENSES_DIR).rglob("*") if p.is_file())
    return [ShardFile(path=str(p.relative_to(out)), rows=0, bytes=p.stat().st_size, sha256=file_sha256(p))
            for p in files]


def check_enough_tokens(t: TrainConfig, cached_tokens: int) -> None:
    """Raise a one-line ConfigError when the cache cannot fill one optimizer step (grad_accum_steps micro-batches
    per process)."""
    usable = cached_tokens * (1 - 1 / t.eval_every_nth_prompt)  # roughly: whole prompts are held out
    if usable < t.micro_batch_tokens * t.world_size * t.grad_accum_steps:
        accum = f" x {t.grad_accum_steps} micro-batches per step" if t.grad_accum_steps > 1 else ""
        raise ConfigError(f"config error: train.micro_batch_tokens: {t.micro_batch_tokens} x {t.world_size} "
                          f"processes{accum} exceeds the ~{int(usable)} training tokens in the cache")


def check_enough_shards(t: TrainConfig, n_shards: int) -> None:
    """Raise a one-line ConfigError when a data-parallel rank would get no cache shard (ranks split whole shards).

    A hostfile run's world size is known only to the launcher: it is checked by the ranks themselves."""
    if t.hostfile is None and n_shards < t.world_size:
        raise ConfigError(f"config error: train.world_size: {t.world_size} processes but the cache has {n_shards} "
                          f"shard(s), and each process trains on whole shards; lower cache.prompts_per_shard or "
                          f"train.world_size")


def _store_results(db: Path, version: str, out: Path) -> dict[str, Any]:
    """Replace the version's curve and fidelity rows from the artifact's files; return the fidelity."""
    fid = json.loads((out / TRAIN_FIDELITY).read_text())
    curve = [json.loads(line) for line in (out / TRAIN_CURVE).read_text().splitlines() if line.strip()]
    store_training_results(db, version, curve_table(version, curve), fidelity_table(version, fid))
    return fid


def store_rows(db: Path, ver: StageVersion) -> None:
    """Load the version's warehouse rows (training curve, lens fidelity) from its folder."""
    _store_results(db, ver.version, ver.artifact.path)


@keeps_old_version()
def run_train_stage(cfg: PipelineConfig, ver: StageVersion, cache_ver: StageVersion, *,
                    force: bool = False) -> dict[str, Any]:
    """Train (resuming from checkpoints), then register lenses, curve and fidelity; return a summary."""
    adir = ver.artifact
    db = warehouse_path(cfg.home)
    manifest = None if force else adir.manifest()
    if manifest is not None:
        shutil.rmtree(adir.path / CHECKPOINTS_DIR, ignore_errors=True)  # left by a run killed after its manifest
        return reuse_complete(ver, manifest)
    cache_manifest = require_complete(cache_ver)
    check_enough_tokens(cfg.train, cache_manifest["summary"]["n_tokens"])
    check_enough_shards(cfg.train, cache_manifest["n_shards"])
    ensure_fits(cfg, STAGE)  # every rank on this machine, training and held-out evaluation
    if force:
        reset_for_force(ver)  # only once the inputs are checked; the old version is kept aside until done
    adir.prepare()
    out = adir.path
    if not (out / TRAIN_RESULT).exists():  # the workers finished before a kill: only registration is left
        cs = cache_manifest["summary"]
        env, worker_device = training_devices(cfg.model.device, cfg.train.world_size,
                                              os.environ.get("CUDA_VISIBLE_DEVICES"))
        spec = {
            "home": str(cfg.home), "cache_version": cache_ver.version, "out_dir": str(out),
            "model": cfg.model.model_dump() | {"device": worker_device}, "train": cfg.train.model_dump(),
            "layers": cached_layers(cache_manifest),
            "store_dtype": cs["store_dtype"], "z_width": cs["n_heads"] * cs["d_head"], "d_model": cs["d_model"],
        }
        (out / TRAIN_SPEC).write_text(json.dumps(spec, indent=1))
        register(ver, status="running")
        rc = run_training_processes(out / TRAIN_SPEC, cfg.train, env)
        # A forced rebuild that stops puts the old complete version back (keeps_old_version): its checkpoints go.
        replacing = replaced_path(ver.artifact).exists()
        if rc == STOP_EXIT_CODE:
            raise TrainingInterrupted("training stopped; the previous complete version is kept" if replacing else
                                      f"training stopped after a checkpoint in {out / CHECKPOINTS_DIR}; "
                                      "run the stage again to resume")
        if rc != 0 or not (out / TRAIN_RESULT).exists():
            register(ver, status="failed")
            why = f"exit code {rc}"
            if rc == -signal.SIGKILL:  # the kernel's out-of-memory killer, most often
                why = (f"killed by SIGKILL, likely out of memory: the plan predicted "
                       f"{gib(predict(cfg, STAGE).total)} for this machine, see `loralens plan --config`")
            kept = ("the previous complete version is kept" if replacing
                    else f"checkpoints kept in {out / CHECKPOINTS_DIR}")
            raise RuntimeError(f"training failed ({why}); {kept}")

    maybe_kill("train.after_workers")
    result = json.loads((out / TRAIN_RESULT).read_text())
    fid = _store_results(db, ver.version, out)
    fidelity_heatmap(fid, out / FIDELITY_HEATMAP)
    adir.record_shard(0, _lens_files(out))
    layer_kl = sum(fid["layer_lens"]) / len(fid["layer_lens"])
    layer_base = sum(fid["layer_logit_lens"]) / len(fid["layer_logit_lens"])
    summary = {**result, "layers": len(fid["layers"]), "held_out_tokens": fid["tokens"],
               "heatmap": str(out / FIDELITY_HEATMAP),
               "mean_layer_kl": layer_kl, "mean_layer_kl_logit_lens": layer_base,
               "lens_config": {k: cfg.train.model_dump()[k] for k in ("form", "rank", "alpha", "objective", "loss")}}
    manifest = adir.finalize(config=ver.config, inputs=ver.inputs, summary=summary)
    register_complete(ver, manifest)
    # Checkpoints served resumption; the consolidated lenses are what later stages (any world size) load.
    shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    return {"version": ver.version, "path": str(out), "cached": False, **summary}


@task(name="train", persist_result=True)  # keyed by flows.common.run_stage_task (version + home)
def train_task(cfg: PipelineConfig, ver: StageVersion, cache_ver: StageVersion, force: bool = False) -> dict[str, Any]:
    """Prefect task: the train stage, keyed by its artifact version."""
    return run_train_stage(cfg, ver, cache_ver, force=force)
