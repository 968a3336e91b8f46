"""Small helpers shared by every test folder, imported as `helpers`.

pytest puts tests/ on sys.path (it holds the rootdir conftest.py; import mode "prepend"), and
children spawned by a test inherit that sys.path, so `from helpers import ...` works in unit,
transport and integration tests and in the processes they start.

* bytes: `pattern`, `i64`
* caches of a manager in this process: `desc`, `raw`, `fill`
* errors: `raises_llm` (the block raises LLMException with a given code), `assert_code`
* shared memory: `shm_files`, `assert_no_shm_files`
* links: `cluster_info`, `link_in_process`
* optional packages: `mooncake_missing`
"""
import contextlib
import importlib
import os
import time
from typing import List, Optional

import pytest
import torch

from llm_datadist_torch import (CacheDesc, DataType, LLMClusterInfo, LLMException, LLMStatusCode,
                                Placement)

LOCAL_IP = "127.0.0.1"
SHM_DIR = "/dev/shm"
SHM_PREFIX = "llm_datadist_torch"


# ---- bytes -------------------------------------------------------------------------------------
def pattern(nbytes: int, seed: int) -> torch.Tensor:
    """Reproducible pseudo-random bytes, distinct per seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


def i64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# ---- caches ------------------------------------------------------------------------------------
def desc(num_tensors, shape, data_type=DataType.DT_UINT8, placement=Placement.DEVICE):
    return CacheDesc(num_tensors, list(shape), data_type, placement)


def raw(manager, cache, index=0) -> torch.Tensor:
    """Tensor `index` of `cache` as a flat uint8 view (aliases the cache memory)."""
    return manager.get_cache_tensors(cache, index)[0].reshape(-1).view(torch.uint8)


def fill(manager, cache, seed: int) -> List[torch.Tensor]:
    """Write a distinct pattern into every tensor; returns copies of what was written."""
    written = []
    for index in range(cache.cache_desc.num_tensors):
        view = raw(manager, cache, index)
        view.copy_(pattern(view.numel(), seed + index))
        written.append(view.clone())
    return written


# ---- errors ------------------------------------------------------------------------------------
def assert_code(excinfo, code) -> None:
    """The error `excinfo` (from pytest.raises) caught carries status `code`."""
    assert excinfo.value.status_code == code, (
        f"expected {code}, got {excinfo.value.status_code!r}: {excinfo.value}")


@contextlib.contextmanager
def raises_llm(code=LLMStatusCode.LLM_PARAM_INVALID, match=None, within_s: Optional[float] = None,
               raised=LLMException):
    """Expect the block to raise an `LLMException` with status `code` (and a message matching
    `match`), within `within_s` seconds if given.

    `raised` is what arrives here: `harness.ChildError` for an LLMException raised in a spawned
    child (its `exc_type` names the child's exception; see `checks.raises_code`).
    """
    start = time.monotonic()
    with pytest.raises(raised, match=match) as info:
        yield info
    elapsed = time.monotonic() - start
    if raised is not LLMException:
        assert info.value.exc_type == "LLMException", info.value
    assert_code(info, code)
    if within_s is not None:
        assert elapsed < within_s, f"{code} after {elapsed:.2f} s, expected < {within_s} s"


# ---- shared memory -----------------------------------------------------------------------------
def shm_files(pid: Optional[int] = None) -> List[str]:
    """The library's /dev/shm arena files owned by process `pid` (default: this process)."""
    marker = f"{SHM_PREFIX}.{os.getpid() if pid is None else pid}."
    try:
        return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(marker))
    except OSError:
        return []


def assert_no_shm_files(pid: int, timeout: float = 2.0) -> None:
    """After `pid` exited cleanly, none of its /dev/shm arena files may remain."""
    deadline = time.monotonic() + timeout
    while shm_files(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    leftover = shm_files(pid)
    assert not leftover, f"process {pid} left shared-memory files behind: {leftover}"


# ---- links -------------------------------------------------------------------------------------
def cluster_info(remote_cluster_id: int, remote_port: Optional[int] = None,
                 remote_ip: str = LOCAL_IP, local_ip: str = LOCAL_IP) -> LLMClusterInfo:
    """The peer `remote_cluster_id`; with `remote_port`, also where it listens (and this side's
    address, any port). Without one: enough to unlink by id."""
    info = LLMClusterInfo()
    info.remote_cluster_id = remote_cluster_id
    if remote_port is not None:
        info.append_local_ip_info(local_ip, 0)
        info.append_remote_ip_info(remote_ip, remote_port)
    return info


def link_in_process(requester, owner, timeout_ms: int = 3000) -> None:
    """Link `requester` to `owner`, a listening instance of this process; asserts success."""
    port = int(owner._links.listening.rsplit(":", 1)[1])
    info = cluster_info(owner.cluster_id, port)
    assert requester.link_clusters([info], timeout_ms)[0] == LLMStatusCode.LLM_SUCCESS


# ---- optional packages -------------------------------------------------------------------------
def mooncake_missing() -> Optional[str]:
    """Why the Mooncake transfer engine cannot be imported, or None where it can."""
    try:
        importlib.import_module("mooncake.engine")
    except ImportError as exc:
        return f"Mooncake is not installed ({exc}); pip install \"llm_datadist_torch[mooncake]\""
    return None
