"""Parse the engine option dict given to `LLMDataDist.init` (spec §8.2, §8.2.1, §21.1).

This is the one place that reads option keys; the rest of the library sees `EngineOptions`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Tuple

from ..status import LLMStatusCode, fail, raise_if_false

PARAM = LLMStatusCode.LLM_PARAM_INVALID
DEFAULT_SYNC_KV_TIMEOUT_MS = 1000
# `hixl` is upstream's only value and means "pick automatically" here; the others force a
# transport of this library.
TRANSFER_BACKENDS = ("hixl", "auto", "local", "shm", "cma", "mooncake")
HOST_POOL_LIMIT = 20 * 10**9
# A torch extra: the shared key links authenticate with (control/auth.py); none = open links.
AUTH_KEY_OPTION = "llm_datadist_torch.AuthKey"
AUTH_KEY_ENV = "LLM_DATADIST_TORCH_AUTH_KEY"


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    memory_size: int
    page_shift: int = 16

    @property
    def page_bytes(self) -> int:
        return 1 << self.page_shift


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    role: str
    cache_manager_mode: bool
    remote_accessible: bool
    local_comm_res: Optional[str]
    listen: Optional[Tuple[str, int]]
    device_id: int
    sync_kv_timeout_ms: int
    mem_pool: Optional[PoolConfig]
    host_mem_pool: Optional[PoolConfig]
    transfer_backend: Optional[str]
    link_total_time_s: int
    link_retry_count: int
    enable_switch_role: bool
    raw: Dict[str, str]
    auth_key: Optional[bytes] = None  # links authenticate with it (control/auth.py)


def strict_limits() -> bool:
    """`LLM_DATADIST_TORCH_STRICT_LIMITS=0` lifts the documented size limits (large test rigs)."""
    return os.environ.get("LLM_DATADIST_TORCH_STRICT_LIMITS", "1") != "0"


def force_staging() -> bool:
    """`LLM_DATADIST_TORCH_STAGE_TRANSFERS=1` moves every cross-process transfer through the
    owner's host staging area, the path device memory takes (to exercise it without a device)."""
    return os.environ.get("LLM_DATADIST_TORCH_STAGE_TRANSFERS", "0") == "1"


def parse_listen(text: str) -> Tuple[str, int]:
    """`"ip:port"` -> (ip, port); a wrong shape is PARAM, a non-numeric port `ValueError`."""
    parts = text.split(":")
    raise_if_false(len(parts) == 2, "llm.listenIpInfo must be 'ip:port', got %r", text)
    port = int(parts[1])
    raise_if_false(0 <= port <= 65535, "llm.listenIpInfo port %d out of range", port)
    return parts[0], port


def _digits(key: str, value: str) -> int:
    raise_if_false(isinstance(value, str) and value.isdigit(), "%s must be decimal digits, got %r",
                   key, value)
    return int(value)


def _flag(options: Dict[str, str], key: str) -> Optional[bool]:
    if key not in options:
        return None
    raise_if_false(options[key] in ("0", "1"), "%s must be '0' or '1', got %r", key, options[key])
    return options[key] == "1"


def parse_pool_config(key: str, text: str) -> PoolConfig:
    """Memory-pool JSON of spec §6.4."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        fail(PARAM, "%s is not valid JSON: %r", key, text)
    raise_if_false(isinstance(data, dict), "%s must be a JSON object", key)
    size = data.get("memory_size")
    shift = data.get("page_shift", 16)
    for name, value in (("memory_size", size), ("page_shift", shift)):
        raise_if_false(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                       "%s.%s must be an unsigned integer, got %r", key, name, value)
    raise_if_false(10 <= shift < 31, "%s.page_shift must be in [10, 31), got %d", key, shift)
    raise_if_false(size >= (1 << shift), "%s.memory_size %d is smaller than one page", key, size)
    raise_if_false((size >> shift) < 2**32 - 1, "%s.memory_size %d has too many pages", key, size)
    return PoolConfig(size, shift)


def _device_id(options: Dict[str, str], cache_manager_mode: bool) -> int:
    text = options.get("ge.exec.deviceId", options.get("llm.DeviceId"))
    if text is None:
        raise_if_false(cache_manager_mode, "ge.exec.deviceId is required")
        return 0
    ids = text.split(";")
    for part in ids:
        raise_if_false(part.isdigit(), "ge.exec.deviceId must be decimal device ids, got %r", text)
    if len(ids) > 1:
        if cache_manager_mode:
            fail(PARAM, "ge.exec.deviceId %r: one device per LLMDataDist", text)
        fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
             "ge.exec.deviceId %r: several devices per process are not supported", text)
    return int(ids[0])


def _check_v1_listen(role: str, options: Dict[str, str]) -> None:
    """v1 PROMPT must listen (spec §21.1 step 1)."""
    if role != "Prompt" or "llm.ClusterInfo" in options:
        return
    text = options.get("llm.listenIpInfo")
    raise_if_false(text is not None, "neither llm.ClusterInfo nor llm.listenIp was specified")
    parts = text.split(";")
    raise_if_false(len(parts) == 1, "llm.listenIpInfo has %d endpoints for 1 device", len(parts))
    raise_if_false(len(parts[0].split(":")) == 2, "llm.listenIpInfo must be 'ip:port', got %r", text)


def parse_options(role: str, user_options) -> EngineOptions:
    """Validate `user_options` for an engine of `role` ("Prompt"/"Decoder"/"Mix")."""
    if not isinstance(user_options, dict):
        raise TypeError(f"options only support dict, but got {type(user_options).__name__}")
    for name, value in user_options.items():  # upstream's binding takes a map of strings
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"options only support dict[str, str], but {name!r} maps to "
                            f"{type(value).__name__} {value!r}")
    if "ge.flowGraphMemMaxSize" in user_options:
        value = user_options["ge.flowGraphMemMaxSize"]
        if not isinstance(value, str):
            raise TypeError("ge.flowGraphMemMaxSize only support str")
        raise_if_false("," not in value, "ge.flowGraphMemMaxSize must be one value, got %r", value)
        raise_if_false(value.isdigit(), "ge.flowGraphMemMaxSize must be digits, got %r", value)
    options = dict(user_options)
    options["llm.Role"] = role
    if "llm.ListenIpInfo" in options and "llm.listenIpInfo" not in options:
        options["llm.listenIpInfo"] = options["llm.ListenIpInfo"]
    if "llm.LocalCommRes" in options:
        options.setdefault("llm.EnableCacheManager", "1")
        options.setdefault("llm.EnableRemoteCacheAccessible", "1")
    cache_manager_mode = options.get("llm.EnableCacheManager") == "1"
    raise_if_false(not ("llm.LocalCommRes" in options and not cache_manager_mode),
                   "llm.LocalCommRes needs llm.EnableCacheManager=1")
    if "llm.TransferBackend" in options:
        raise_if_false(cache_manager_mode, "llm.TransferBackend needs llm.EnableCacheManager=1")
        options.setdefault("llm.EnableRemoteCacheAccessible", "1")
        raise_if_false(options["llm.EnableRemoteCacheAccessible"] == "1",
                       "llm.TransferBackend needs llm.EnableRemoteCacheAccessible=1")
        raise_if_false("llm.listenIpInfo" in options, "llm.TransferBackend needs llm.listenIpInfo")
        raise_if_false(options["llm.TransferBackend"] in TRANSFER_BACKENDS,
                       "llm.TransferBackend must be one of %s, got %r",
                       TRANSFER_BACKENDS, options["llm.TransferBackend"])
    listen = None
    if "llm.listenIpInfo" in options:
        if cache_manager_mode:
            listen = parse_listen(options["llm.listenIpInfo"])
        else:
            _check_v1_listen(role, options)
            listen = parse_listen(options["llm.listenIpInfo"].split(";")[0])
    elif not cache_manager_mode:
        _check_v1_listen(role, options)
    local_comm_res = options.get("llm.LocalCommRes")
    if local_comm_res:
        try:
            json.loads(local_comm_res)
        except ValueError:
            fail(PARAM, "llm.LocalCommRes is not valid JSON")
    remote_flag = _flag(options, "llm.EnableRemoteCacheAccessible")
    _flag(options, "llm.EnableCacheManager")
    timeout_ms = DEFAULT_SYNC_KV_TIMEOUT_MS
    if "llm.SyncKvCacheWaitTime" in options:
        timeout_ms = _digits("llm.SyncKvCacheWaitTime", options["llm.SyncKvCacheWaitTime"])
        raise_if_false(timeout_ms > 0, "llm.SyncKvCacheWaitTime must be > 0")
    for key in ("llm.RdmaTrafficClass", "llm.RdmaServiceLevel"):
        if key in options:
            raise_if_false(_digits(key, options[key]) < 2**32, "%s must be a uint32", key)
    total_time = _digits("llm.LinkTotalTime", options["llm.LinkTotalTime"]) \
        if "llm.LinkTotalTime" in options else 0
    raise_if_false(total_time < 2**31, "llm.LinkTotalTime must be an int32")
    retries = _digits("llm.LinkRetryCount", options["llm.LinkRetryCount"]) \
        if "llm.LinkRetryCount" in options else 1
    raise_if_false(1 <= retries <= 100, "llm.LinkRetryCount must be in [1, 100]")
    pools = {}
    for key in ("llm.MemPoolConfig", "llm.HostMemPoolConfig"):
        pools[key] = parse_pool_config(key, options[key]) if key in options else None
    host_pool = pools["llm.HostMemPoolConfig"]
    raise_if_false(host_pool is None or not strict_limits() or host_pool.memory_size <= HOST_POOL_LIMIT,
                   "llm.HostMemPoolConfig.memory_size exceeds the %d byte host pool limit",
                   HOST_POOL_LIMIT)
    return EngineOptions(
        role=role,
        cache_manager_mode=cache_manager_mode,
        remote_accessible=bool(remote_flag),
        local_comm_res=local_comm_res,
        listen=listen,
        device_id=_device_id(options, cache_manager_mode),
        sync_kv_timeout_ms=timeout_ms,
        mem_pool=pools["llm.MemPoolConfig"],
        host_mem_pool=host_pool,
        transfer_backend=options.get("llm.TransferBackend"),
        link_total_time_s=total_time,
        link_retry_count=retries,
        enable_switch_role=options.get("llm.EnableSwitchRole") == "1",
        raw=options,
        auth_key=(options.get(AUTH_KEY_OPTION) or os.environ.get(AUTH_KEY_ENV, "")).encode() or None,
    )
