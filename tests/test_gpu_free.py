"""Free GPU memory for the memory checks: read through NVML (no CUDA context), mapped from CUDA's numbering of the
visible GPUs to NVML's, else through CUDA.

On this CPU machine only the pure mapping and the fallback can be checked: NVML itself, and whether it really leaves
no context, need a GPU (`tests/test_gpu.py`).
"""

from __future__ import annotations

import sys

import pytest
import torch

from loralens.lens.memory.gpu_free import nvml_free_bytes, visible_nvml_indices
from loralens.lens.memory.stage_memory import gpu_free_memory

UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-bbbc3333-0000", "GPU-cccc4444-0000"]


def test_cuda_ordinals_map_to_nvml_indices():
    assert visible_nvml_indices(None, UUIDS) == [0, 1, 2, 3]  # unset: every GPU, same order
    assert visible_nvml_indices("2,0", UUIDS) == [2, 0]  # CUDA device 0 is NVML device 2
    assert visible_nvml_indices(" 3 ", UUIDS) == [3]
    assert visible_nvml_indices("1gpu", UUIDS) == [1]  # CUDA reads the leading digits
    assert visible_nvml_indices("0,7,1", UUIDS) == [0]  # a device that does not exist ends the list
    assert visible_nvml_indices("1,x,2", UUIDS) == [1]
    assert visible_nvml_indices("1,1", UUIDS) == []  # a device named twice: CUDA sees none
    assert visible_nvml_indices("", UUIDS) == []


def test_cuda_uuids_map_to_nvml_indices():
    assert visible_nvml_indices("GPU-cccc4444-0000,GPU-aaaa", UUIDS) == [3, 0]  # whole UUIDs or unique prefixes
    assert visible_nvml_indices("GPU-bbbb,GPU-bbb", UUIDS) == [1]  # an ambiguous prefix ends the list
    assert visible_nvml_indices("GPU-dddd", UUIDS) == []


def test_what_nvml_cannot_stand_for_is_none():
    assert visible_nvml_indices("MIG-aaaa1111-0000", UUIDS) is None  # a MIG slice's memory is not its GPU's
    assert visible_nvml_indices("0,MIG-aaaa1111-0000", UUIDS) is None
    # CUDA numbering GPUs of different kinds fastest first: its ordinals are not NVML's; UUIDs still are.
    assert visible_nvml_indices(None, UUIDS, pci_order=False) is None
    assert visible_nvml_indices("1,0", UUIDS, pci_order=False) is None
    assert visible_nvml_indices("GPU-cccc,GPU-aaaa", UUIDS, pci_order=False) == [3, 0]


def test_without_nvml_free_memory_is_asked_of_cuda(monkeypatch):
    """No `pynvml` (as on this machine): NVML answers nothing and `gpu_free_memory` asks CUDA, which on a torch
    without CUDA raises (on a GPU machine it answers)."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml fails, whatever is installed
    assert nvml_free_bytes(("cuda:0",)) is None
    if torch.cuda.is_available():
        assert gpu_free_memory(("cuda:0",))["cuda:0"] > 0
    else:
        with pytest.raises((AssertionError, RuntimeError)):  # torch.cuda.mem_get_info without CUDA
            gpu_free_memory(("cuda:0",))
