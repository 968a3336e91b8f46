"""Which torch device caches live on: NPU (torch_npu) -> CUDA -> CPU (spec §26.1).

`LLM_DATADIST_TORCH_DEVICE` forces a device type (`cpu`, `cuda`, `npu`, optionally with an
index such as `cuda:1`). torch_npu is imported lazily and only here: on machines without CANN
its import fails, and that simply means "no NPU".
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import torch

from ..status import LLMStatusCode, fail

logger = logging.getLogger(__name__)

ENV_DEVICE = "LLM_DATADIST_TORCH_DEVICE"


def _npu_module():
    """`torch.npu` when torch_npu imports and has a device, else None."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        importlib.import_module("torch_npu")
        module = getattr(torch, "npu", None)
        return module if module is not None and module.is_available() else None
    except Exception as exc:  # broken CANN installs raise all kinds of errors at import
        logger.debug("torch_npu is installed but unusable: %s", exc)
        return None


def accelerator_module(device_type: str):
    """The torch submodule that manages `device_type` (torch.cuda, torch.npu), or None."""
    if device_type == "cuda":
        return torch.cuda
    if device_type == "npu":
        return _npu_module()
    return None


def resolve_device(device_id: int) -> torch.device:
    """The device for `device_id`; `LLMException(LLM_PARAM_INVALID)` if it does not exist."""
    forced = os.environ.get(ENV_DEVICE, "").strip()
    if forced:
        try:
            wanted = torch.device(forced)
        except (RuntimeError, ValueError):
            fail(LLMStatusCode.LLM_PARAM_INVALID, "%s=%r is not a torch device", ENV_DEVICE, forced)
        device_type = wanted.type
        index = wanted.index if wanted.index is not None else device_id
    elif _npu_module() is not None:
        device_type, index = "npu", device_id
    elif torch.cuda.is_available():
        device_type, index = "cuda", device_id
    else:
        device_type, index = "cpu", device_id
    if device_type == "cpu":
        return torch.device("cpu")
    module = accelerator_module(device_type)
    if module is None or not module.is_available():
        fail(LLMStatusCode.LLM_PARAM_INVALID, "device type %r is not available", device_type)
    if not 0 <= index < module.device_count():
        fail(LLMStatusCode.LLM_PARAM_INVALID, "device_id %d is out of range: %d %s device(s)",
             index, module.device_count(), device_type)
    return torch.device(device_type, index)


def device_range_allocated(device: torch.device, addr: int, nbytes: int) -> bool:
    """Whether [addr, addr+nbytes) lies in one segment of torch's allocator on `device`.

    Registered device memory arrives as bare integers; checking them against the caching
    allocator's segments keeps a bogus address from ever reaching a copy kernel. Backends
    without a memory snapshot cannot be checked and are trusted.
    """
    module = accelerator_module(device.type)
    snapshot = getattr(getattr(module, "memory", None), "memory_snapshot", None)
    if snapshot is None:
        return True
    for segment in snapshot():
        if segment.get("device", device.index) != device.index:
            continue
        start = segment["address"]
        if start <= addr and addr + nbytes <= start + segment["total_size"]:
            return True
    return False


def synchronize(device: torch.device) -> None:
    """Wait for work queued on `device` (a no-op on CPU)."""
    module = accelerator_module(device.type)
    if module is not None:
        module.synchronize(device)
