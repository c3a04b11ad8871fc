"""Free memory of each GPU as the memory checks read it: through NVML where it can answer, else through CUDA.

`torch.cuda.mem_get_info` creates a CUDA context on the GPU it asks about (~0.3-0.5 GB there, kept for the life of
the process), so a flow process checking a `device_map` stage or 8 training ranks would leave a context on every GPU
it checked, memory the stage itself then lacks. NVML (the `pynvml` module of the `nvidia-ml-py` package, installed
by `TORCH=cuda ./scripts/install.sh`) reads the same driver figure without a context. NVML numbers every GPU of the
machine by PCI bus; CUDA numbers only the visible ones (`CUDA_VISIBLE_DEVICES`, ordinals or `GPU-` UUIDs):
`visible_nvml_indices` maps one onto the other.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence


def visible_nvml_indices(visible: str | None, uuids: Sequence[str], pci_order: bool = True) -> list[int] | None:
    """Return the NVML index of each CUDA device, in CUDA's order (CUDA device i is NVML device `result[i]`), or
    None where NVML cannot stand for CUDA's numbering.

    `visible`: CUDA_VISIBLE_DEVICES (None: unset, every GPU); `uuids`: NVML's device UUIDs (``GPU-...``) in NVML's
    order. Read as CUDA reads it: comma-separated ordinals or (unique prefixes of) ``GPU-`` UUIDs; the first entry
    that names no device ends the list; a device named twice makes it empty. None for MIG entries (a MIG slice's
    free memory is not its GPU's) and for ordinals when CUDA may not number the GPUs by PCI bus (`pci_order` False:
    CUDA_DEVICE_ORDER is not PCI_BUS_ID and the GPUs differ, so CUDA's "fastest first" order is not NVML's).
    """
    if visible is None:
        return list(range(len(uuids))) if pci_order else None
    out: list[int] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.startswith("MIG-"):
            return None
        if entry.startswith("GPU-"):
            matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
            if len(matches) != 1:
                break
            index = matches[0]
        else:
            digits = re.match(r"\d+", entry)  # CUDA reads a number's leading digits, as strtoul does
            if digits is None or int(digits.group()) >= len(uuids):
                break
            if not pci_order:
                return None
            index = int(digits.group())
        if index in out:
            return []
        out.append(index)
    return out


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older nvidia-ml-py returns bytes


def _mig_enabled(pynvml, handle) -> bool:  # noqa: ANN001 - the pynvml module and an NVML device handle
    try:
        return bool(pynvml.nvmlDeviceGetMigMode(handle)[0])
    except pynvml.NVMLError:  # not supported: no MIG on this GPU
        return False


def nvml_free_bytes(gpus: Sequence[str]) -> dict[str, int] | None:
    """Return each GPU's free bytes (`gpus`: "cuda:N", CUDA's numbering in this process) read through NVML, which
    creates no CUDA context; None where NVML cannot answer for all of them (no `pynvml`, no driver, MIG, a GPU
    it cannot map: `visible_nvml_indices`), for the caller to ask CUDA instead."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        same_kind = len({_text(pynvml.nvmlDeviceGetName(h)) for h in handles}) <= 1
        pci_order = os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" or same_kind
        indices = visible_nvml_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids, pci_order)
        free = {}
        for gpu in dict.fromkeys(gpus):
            cuda_index = int(gpu.partition(":")[2] or 0)
            if indices is None or cuda_index >= len(indices) or _mig_enabled(pynvml, handles[indices[cuda_index]]):
                return None
            free[gpu] = int(pynvml.nvmlDeviceGetMemoryInfo(handles[indices[cuda_index]]).free)
        return free
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass  # the figures are read; a failed shutdown changes none of them
