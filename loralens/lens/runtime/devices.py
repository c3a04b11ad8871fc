"""One device policy for every stage: which device and dtype a configured `model.device` / `model.dtype` mean here.

    model.device  auto -> cuda when CUDA is available, else cpu;  cpu;  cuda (the current / LOCAL_RANK GPU);  cuda:N
    model.dtype   auto -> bfloat16 on cuda, float32 on cpu;  float32;  bfloat16;  float16

The device is execution-only (never in a version); the resolved dtype changes results, so versions hash it.
One process per GPU: a process started by a launcher (torchrun, deepspeed, a Dask worker with
CUDA_VISIBLE_DEVICES) uses `LOCAL_RANK` to pick its GPU when the config says plain `cuda`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from loralens.config import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DTYPES = ("float32", "bfloat16", "float16")


class DeviceError(ConfigError):
    """A configured device that this machine does not have (one line)."""


def quiet_deepspeed_on_cpu() -> None:
    """Pin DeepSpeed's accelerator to the CPU (`DS_ACCELERATOR=cpu`, inherited by the training processes) where
    torch sees no CUDA device, before anything imports DeepSpeed (accelerate imports it to save a model).

    DeepSpeed's auto-detection falls back to the CPU there too, but prints "Setting accelerator to CPU..." on stdout
    in every process that imports it. Lora Lens runs on cpu or cuda only, so the pin changes no device it uses.
    Left alone where CUDA devices exist (detection picks cuda, as before) or DS_ACCELERATOR is set. The GPUs are
    counted through NVML (`torch.cuda.device_count`): CUDA is not initialised here.
    """
    if "DS_ACCELERATOR" not in os.environ and torch.cuda.device_count() == 0:
        os.environ["DS_ACCELERATOR"] = "cpu"


quiet_deepspeed_on_cpu()  # at import: every stage's device choice goes through this module before a model loads


def resolve_device(spec: str) -> torch.device:
    """Return the torch device `spec` ("auto", "cpu", "cuda", "cuda:N") means on this machine.

    Raises DeviceError naming `model.device` when CUDA is asked for and absent, or the GPU index is out of range.
    """
    if not DEVICE_PATTERN.match(spec):
        raise DeviceError(f"config error: model.device: {spec!r} is not auto, cpu, cuda or cuda:N")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")  # host: what "cpu" means
    if not torch.cuda.is_available():
        raise DeviceError(f"config error: model.device: {spec} asked for, but this machine has no CUDA device "
                          f"(torch {torch.__version__}, cuda {torch.version.cuda or 'not built'}); use auto or cpu")
    index = int(spec.split(":")[1]) if ":" in spec else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise DeviceError(f"config error: model.device: {spec} (GPU {index}) asked for, but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def visible_gpus(visible: str | None, n_gpus: int) -> list[str]:
    """Return how each of the `n_gpus` GPUs this process sees is named to a child process's
    `CUDA_VISIBLE_DEVICES`: the entries of the inherited list `visible` (ordinals or UUIDs), else "0".."n-1"."""
    return [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(n_gpus)]


def check_local_workers(device: str, workers: int, n_gpus: int | None = None) -> None:
    """Raise a one-line DeviceError when the local Dask workers of a GPU run would not get one GPU each.

    Local worker i takes GPU i (`flows/dask_workers.py`); with more workers than GPUs, or `cuda:N` pinning one GPU
    for several workers, models would pile onto the same GPU. `n_gpus` defaults to this machine's count.
    """
    n = torch.cuda.device_count() if n_gpus is None else n_gpus
    if workers <= 1 or not (device.startswith("cuda") or (device == "auto" and n > 0)):
        return
    if ":" in device:
        raise DeviceError(f"config error: run.workers: {workers} local workers, but model.device: {device} pins one "
                          f"GPU (use 'cuda': one GPU per worker)")
    if workers > n:
        raise DeviceError(f"config error: run.workers: {workers} local workers, but this machine has {n} GPU(s); "
                          f"each worker holds a model on its own GPU")


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """Return the dtype name `dtype` means on `device` ("auto": bfloat16 on cuda, float32 on cpu)."""
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise DeviceError(f"config error: model.dtype: {dtype!r} is not auto, {', '.join(DTYPES)}")
    return dtype


def host_compute_dtype(dtype: str, device: torch.device) -> str:
    """Return the dtype the select and intervene stages run the model in: float32 for a half-precision model on a
    CPU (bf16/fp16 matmuls there, with oneDNN off for `steady_host_matmuls`, run on slow reference kernels: the
    select stage's backward passes took over 30 minutes on a 2-layer Llama-3-8B-shaped model), else `dtype`
    unchanged. The memory plan counts the float32 weights."""
    return "float32" if device.type == "cpu" and dtype in ("bfloat16", "float16") else dtype


def dist_backend(device: torch.device) -> str:
    """Return the torch.distributed backend for a rank on `device`: NCCL on GPUs, gloo on CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def input_device(model) -> torch.device:
    """Return where a model's inputs go: its `device` (the first shard's under a device_map), else its first
    parameter's."""
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def rows_of(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return `t[mask]` with the mask moved to `t`'s device (under a device_map, layers live on several GPUs)."""
    return t[mask.to(t.device)]


@contextmanager
def steady_host_matmuls(model) -> Iterator[None]:
    """Run a half-precision model on a CPU with oneDNN off (elsewhere: change nothing).

    Measured on the 2-layer Llama-3-8B-shaped bf16 model: with oneDNN, plain `generate()` calls grew the process
    from 2.4 GB to 7.7-10.4 GB within a few calls (in the bf16 lm_head's Linear, by py-spy); with it off the same
    calls stayed at 2.4 GB. Sampling and perplexity run inside this.
    """
    half = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    if input_device(model).type != "cpu" or not half:
        yield
        return
    with warnings.catch_warnings():  # setting the flags warns about TF32 on Intel GPUs, which do not apply here
        warnings.simplefilter("ignore", UserWarning)
        flags = torch.backends.mkldnn.flags(enabled=False)
        flags.__enter__()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flags.__exit__(None, None, None)


def auto_here(device: str, dtype: str) -> dict[str, str | int]:
    """Return what `model.device` / `model.dtype` mean in this process: {"device", "dtype", "host", "pid"}.

    Dask workers run it (`WorkerPool.resolve_auto`) so that `auto` is decided where the model runs; the flow
    process runs it for itself when the work stays on this machine. `device` is the device's type (cpu, cuda).
    """
    import socket

    where = resolve_device(device)
    return {"device": where.type, "dtype": resolve_dtype(dtype, where), "host": socket.gethostname(),
            "pid": os.getpid()}


def agreed_dtype(answers: dict[str, dict]) -> str:
    """Return the dtype every process's `auto_here` answer in `answers` (keyed by worker address) resolved.

    Raises a one-line DeviceError naming `model.dtype` when they disagree (some workers with CUDA, some without),
    listing which workers resolved which dtype on which device, or when there is no answer at all.
    """
    if not answers:
        raise DeviceError("config error: model.dtype: auto, but the Dask scheduler has no workers to resolve it "
                          "on; set model.dtype explicitly (float32, bfloat16 or float16)")
    kinds: dict[tuple[str, str], list[str]] = {}
    for who, answer in sorted(answers.items()):
        kinds.setdefault((answer["dtype"], answer["device"]), []).append(who)
    if len({dtype for dtype, _ in kinds}) == 1:
        return next(iter(kinds))[0]
    seen = "; ".join(f"{dtype} on {device} at {', '.join(who)}" for (dtype, device), who in sorted(kinds.items()))
    raise DeviceError(f"config error: model.dtype: auto resolves differently on the Dask workers ({seen}); set "
                      f"model.dtype explicitly (float32, bfloat16 or float16)")
