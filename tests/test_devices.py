"""The device policy on a CPU machine: explicit cpu, auto, a cuda config refused in one line; the resolved dtype
(not "auto") is what versions hash. GPU paths: `tests/test_gpu.py` (marked `gpu`, skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from loralens.config import parse_config
from loralens.lens.runtime.devices import DeviceError, dist_backend, resolve_device, resolve_dtype
from loralens.tasks.stages.cache import cache_version

NO_CUDA = not torch.cuda.is_available()


def test_auto_and_cpu_resolve_and_dtype_follows_the_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("auto", torch.device("cuda", 0)) == "bfloat16"
    assert resolve_dtype("float16", torch.device("cpu")) == "float16"
    assert dist_backend(torch.device("cpu")) == "gloo" and dist_backend(torch.device("cuda", 1)) == "nccl"


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_on_a_machine_without_it_is_one_line(spec, tiny_models, tmp_path):
    cfg = parse_config({"home": str(tmp_path), "model": {"name": str(tiny_models["gpt2"]), "device": spec}})
    with pytest.raises(DeviceError) as err:
        cache_version(cfg)  # every stage's version chain starts here, before anything is loaded or written
    msg = str(err.value)
    assert msg.startswith("config error: model.device:") and "no CUDA device" in msg and "\n" not in msg
    assert not (tmp_path / "artifacts").exists()


def test_bad_device_name_is_a_config_error(tmp_path):
    from loralens.config import ConfigError

    with pytest.raises(ConfigError, match="model.device"):
        parse_config({"home": str(tmp_path), "model": {"device": "gpu0"}})


def test_versions_hash_the_resolved_dtype_not_auto(tiny_models, tmp_path):
    """On a CPU `auto` means float32: the same version as an explicit float32 (and as homes made before `auto`),
    another than bfloat16; the device is execution-only."""
    base = {"home": str(tmp_path), "model": {"name": str(tiny_models["gpt2"])}}
    auto = cache_version(parse_config(base)).version
    explicit = cache_version(parse_config(base | {"model": base["model"] | {"dtype": "float32", "device": "cpu"}}))
    bf16 = cache_version(parse_config(base | {"model": base["model"] | {"dtype": "bfloat16"}}))
    if NO_CUDA:
        assert auto == explicit.version
    assert bf16.version != explicit.version


def test_half_precision_sampling_on_a_cpu_runs_without_onednn():
    """The guard the intervene stage samples in: oneDNN off for a bf16 model on a CPU, back on after; an fp32
    model is left alone."""
    from loralens.lens.runtime.devices import steady_host_matmuls

    before = torch.backends.mkldnn.enabled
    with steady_host_matmuls(torch.nn.Linear(4, 4).to(torch.bfloat16)):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled == before
    with steady_host_matmuls(torch.nn.Linear(4, 4)):
        assert torch.backends.mkldnn.enabled == before


def test_training_processes_see_the_pinned_gpu_alone():
    """`model.device: cuda:N`: the training processes get CUDA_VISIBLE_DEVICES=N and plain `cuda`, so DeepSpeed's
    LOCAL_RANK placement and the batches are on the same GPU."""
    from loralens.config import ConfigError
    from loralens.tasks.stages.train import training_devices

    assert training_devices("cpu", 2, None) == ({}, "cpu")
    assert training_devices("cuda", 4, "0,1,2,3") == ({}, "cuda")
    assert training_devices("cuda:1", 1, None) == ({"CUDA_VISIBLE_DEVICES": "1"}, "cuda")
    assert training_devices("cuda:1", 1, "4, 6") == ({"CUDA_VISIBLE_DEVICES": "6"}, "cuda")  # N indexes the visible
    with pytest.raises(ConfigError, match=r"^config error: model.device: cuda:1 pins one GPU, but train.world_size"):
        training_devices("cuda:1", 2, None)
    with pytest.raises(ConfigError, match=r"^config error: model.device: cuda:2, but CUDA_VISIBLE_DEVICES=0,1 has"):
        training_devices("cuda:2", 1, "0,1")


def test_hostfile_ranks_get_the_environment_through_the_deepspeed_env_file():
    from loralens.tasks.stages.train import deepspeed_env

    env = {"HF_HOME": "/data/hf", "LORALENS_HOME": "/proj", "PATH": "/usr/bin", "NCCL_DEBUG": "WARN",
           "OMP_NUM_THREADS": "8", "SECRET_TOKEN": "x", "HF_BAD": "two\nlines"}
    assert deepspeed_env(env) == "HF_HOME=/data/hf\nLORALENS_HOME=/proj\nNCCL_DEBUG=WARN\nOMP_NUM_THREADS=8\n"


def test_a_hostfile_runs_version_hashes_the_world_size_it_starts(tmp_path, tiny_models):
    """`train.hostfile` with 2 hosts x 4 slots: the train version is the one of world_size 8, not the config's."""
    from loralens.config import ConfigError, parse_config
    from loralens.tasks.stage_versions import StageVersion
    from loralens.tasks.stages.train import hostfile_world_size, train_version

    hosts = tmp_path / "hostfile"
    hosts.write_text("# nodes\nnode-a slots=4\n\nnode-b slots=4  # second\n")
    assert hostfile_world_size(str(hosts)) == 8
    cache = StageVersion("cache", "c0", {}, {}, tmp_path)
    base = {"home": str(tmp_path), "model": {"name": str(tiny_models["llama"])}}
    with_hostfile = train_version(parse_config(base | {"train": {"hostfile": str(hosts)}}), cache)
    eight = train_version(parse_config(base | {"train": {"world_size": 8}}), cache)
    one = train_version(parse_config(base), cache)
    assert with_hostfile.version == eight.version != one.version
    (tmp_path / "bad").write_text("node-a\n")
    with pytest.raises(ConfigError, match=r"^config error: train.hostfile: .*bad line 1: expected 'HOST slots=N'"):
        hostfile_world_size(str(tmp_path / "bad"))


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_run_with_cuda_on_a_machine_without_it_stops_before_prefect(tmp_path):
    """`loralens run` with `model.device: cuda` and no CUDA: one line, the last printed, exit 2, no flow run (no
    Prefect server, no home written)."""
    import subprocess
    import sys

    config = tmp_path / "run.yaml"
    config.write_text(f"home: {tmp_path / 'home'}\nmodel:\n  device: cuda\n")
    proc = subprocess.run([sys.executable, "-m", "loralens.flows.cli", "run", "--config", str(config), "--only",
                           "cache"], capture_output=True, text=True, timeout=120)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2
    assert lines[-1].startswith("loralens: error: config error: model.device: cuda asked for, but this machine has")
    assert not any("Prefect" in line or "flow run" in line for line in lines), lines
    assert not (tmp_path / "home").exists()


def test_local_workers_of_a_gpu_run_get_one_gpu_each():
    from loralens.lens.runtime.devices import check_local_workers

    check_local_workers("cpu", 4, n_gpus=0)
    check_local_workers("auto", 4, n_gpus=0)  # auto without GPUs: CPU workers
    check_local_workers("cuda", 2, n_gpus=2)
    check_local_workers("cuda:1", 1, n_gpus=2)
    with pytest.raises(DeviceError, match=r"^config error: run.workers: 3 local workers, but this machine has 2 GPU"):
        check_local_workers("auto", 3, n_gpus=2)
    with pytest.raises(DeviceError, match=r"^config error: run.workers: 2 local workers, but model.device: cuda:0"):
        check_local_workers("cuda:0", 2, n_gpus=4)


def test_select_and_intervene_compute_a_half_model_in_float32_on_a_cpu(tiny_models, tmp_path):
    """bf16 matmuls on a CPU (oneDNN off) run on slow reference kernels: with `host_float32` (select, intervene)
    the stage model of a bf16 config loads in float32 there, and their plans count 4-byte weights; other stages
    keep bf16; a GPU keeps its dtype."""
    from loralens.lens.runtime.devices import host_compute_dtype
    from loralens.tasks.memory import predict
    from loralens.tasks.workers.worker_process import stage_model

    assert host_compute_dtype("bfloat16", torch.device("cpu")) == "float32"
    assert host_compute_dtype("float16", torch.device("cpu")) == "float32"
    assert host_compute_dtype("float32", torch.device("cpu")) == "float32"
    assert host_compute_dtype("bfloat16", torch.device("cuda", 0)) == "bfloat16"
    raw = {"home": str(tmp_path / "home"), "model": {"name": str(tiny_models["llama"]), "dtype": "bfloat16"}}
    cfg = parse_config(raw)
    assert next(stage_model(cfg, host_float32=True).model.parameters()).dtype == torch.float32
    assert next(stage_model(cfg).model.parameters()).dtype == torch.bfloat16
    assert cfg.model.dtype == "bfloat16"  # the config itself is left as it was
    fp32 = parse_config(raw | {"model": raw["model"] | {"dtype": "float32"}})
    for stage in ("select", "intervene"):
        assert dict(predict(cfg, stage).parts)["model weights"] == dict(predict(fp32, stage).parts)["model weights"]
    assert predict(cfg, "cache").total < predict(fp32, "cache").total  # the cache stage runs in bf16


def test_the_select_plan_counts_the_trained_lenses_its_lens_directions_read(tmp_path):
    """Measured on the 2-layer Llama-3-8B-shaped model: select peaked at 12.7 GB against a 6.8 GB plan that left
    out the lenses read for the `lens` directions and their [chunk, heads, vocab] blocks. The plan now has that
    phase (the model in fp32 on a CPU, the lean lenses, the blocks) when `lens` is a source, and not without it."""
    from transformers import LlamaConfig

    from loralens.tasks.memory import predict

    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, torch_dtype="bfloat16").to_json_file(tmp_path / "config.json")
    raw = {"home": str(tmp_path / "home"), "model": {"name": str(tmp_path / "config.json"), "dtype": "bfloat16"}}
    with_lens = predict(parse_config(raw), "select")
    parts = dict(with_lens.parts)
    assert parts["model weights"] > 5.9e9  # 1.49 B parameters in fp32
    assert parts["trained lenses (lean weights, fp32 fold, banks)"] > 128256 * 4096 * (2 + 4)  # bf16 + fp32 fold
    iv = dict(predict(parse_config(raw), "intervene").parts)  # loading bf16 files into fp32 maps them meanwhile
    assert iv["stored weights mapped while converting"] == parts["model weights"] // 2
    blocks = parts["lens-direction [chunk, heads, vocab] blocks"]
    assert 0 < blocks <= 2**30  # bounded by lens_direction_chunk
    assert with_lens.total == sum(parts.values()) > 10e9
    no_lens = predict(parse_config(raw | {"select": {"steering": {"sources": ["contrast", "unembed"]}}}), "select")
    assert "trained lenses (lean weights, fp32 fold, banks)" not in dict(no_lens.parts)
    assert no_lens.total < with_lens.total
