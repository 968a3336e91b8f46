"""`LLMConfig` (option builder, spec §6) and `LLMClusterInfo` (link peer, spec §7)."""
from __future__ import annotations

import json
import socket
from typing import List, Tuple, Union

from ._checks import check_int32, check_isinstance, check_uint16, check_uint32, check_uint64
from .enums import LLMRole
from .status import raise_if_false

_UINT32_MAX = 2**32 - 1


def ip_to_int(ip: Union[str, int]) -> int:
    """A dotted IPv4 string -> the little-endian integer the engine uses; ints pass unchanged.

    An unparsable string (including IPv6) raises `RuntimeError`, as upstream does.
    """
    if not isinstance(ip, str):
        return ip
    try:
        packed = socket.inet_aton(ip)
    except (OSError, ValueError):  # ValueError: embedded NUL
        raise RuntimeError(f"Can not parse ip str:{ip}") from None
    return int.from_bytes(packed, byteorder="little")


def ip_int_to_str(ip: int) -> str:
    """Inverse of `ip_to_int` for sockets: `0x04030201` -> `"1.2.3.4"`."""
    if not isinstance(ip, int):
        raise TypeError(f"ip only support int, but got {type(ip).__name__}")
    if not 0 <= ip <= _UINT32_MAX:
        raise ValueError(f"ip {ip} is not a 32-bit IPv4 integer")
    return socket.inet_ntoa(ip.to_bytes(4, byteorder="little"))


class LLMClusterInfo:
    """One peer for `link_clusters` / `unlink_clusters`."""

    def __init__(self):
        self._remote_cluster_id = None
        self._remote_role_type = None
        self._local_ip_info_list: List[Tuple[int, int]] = []
        self._remote_ip_info_list: List[Tuple[int, int]] = []

    @property
    def remote_cluster_id(self):
        return self._remote_cluster_id

    @remote_cluster_id.setter
    def remote_cluster_id(self, remote_cluster_id):
        check_uint64("remote_cluster_id", remote_cluster_id)
        self._remote_cluster_id = remote_cluster_id

    @property
    def remote_role_type(self):
        # Stored only: the role type is never transmitted (upstream always sends 0).
        return self._remote_role_type

    @remote_role_type.setter
    def remote_role_type(self, remote_role_type):
        check_isinstance("remote_role_type", remote_role_type, [LLMRole, int])
        self._remote_role_type = remote_role_type

    @property
    def local_ip_info_list(self) -> List[Tuple[int, int]]:
        return self._local_ip_info_list

    @property
    def remote_ip_info_list(self) -> List[Tuple[int, int]]:
        return self._remote_ip_info_list

    def append_local_ip_info(self, ip: Union[str, int], port: int) -> None:
        self._local_ip_info_list.append(self._endpoint(ip, port))

    def append_remote_ip_info(self, ip: Union[str, int], port: int) -> None:
        self._remote_ip_info_list.append(self._endpoint(ip, port))

    @staticmethod
    def _endpoint(ip, port) -> Tuple[int, int]:
        check_isinstance("ip", ip, [str, int])  # None passes, as upstream
        check_uint16("port", port)
        return ip_to_int(ip), port


_NO_SUBSTITUTE = object()


def _plain_option(name: str, classes, unset=_NO_SUBSTITUTE) -> property:
    """A property whose setter only type-checks (None passes and means "unset").

    `unset` is what the getter shows while the stored value is None.
    """
    attr = "_" + name

    def fget(self):
        value = getattr(self, attr)
        if value is None and unset is not _NO_SUBSTITUTE:
            return unset
        return value

    def fset(self, value):
        check_isinstance(name, value, classes)
        setattr(self, attr, value)

    return property(fget, fset)


class LLMConfig:
    """Builds the `Dict[str, str]` of engine options passed to `LLMDataDist.init`."""

    listen_ip_info = _plain_option("listen_ip_info", str)
    deploy_res_path = _plain_option("deploy_res_path", str)
    buf_pool_cfg = _plain_option("buf_pool_cfg", str)
    output_max_size = _plain_option("output_max_size", int)
    enable_switch_role = _plain_option("enable_switch_role", bool)
    enable_cache_manager = _plain_option("enable_cache_manager", bool, unset=False)
    enable_remote_cache_accessible = _plain_option("enable_remote_cache_accessible", bool,
                                                   unset=False)
    mem_pool_cfg = _plain_option("mem_pool_cfg", str)
    host_mem_pool_cfg = _plain_option("host_mem_pool_cfg", str)
    local_comm_res = _plain_option("local_comm_res", str, unset="")
    transfer_backend = _plain_option("transfer_backend", str, unset="")
    global_resource_config = _plain_option("global_resource_config", str, unset="")

    def __init__(self):
        self._options = {}
        self._listen_ip_info = ""
        self._device_id = None
        self._sync_kv_timeout = None
        self._deploy_res_path = ""
        self._ge_options = {}
        self._enable_switch_role = False
        self._link_total_time = None
        self._link_retry_count = None
        self._cluster_info = ""
        self._output_max_size = None
        self._mem_utilization = 0.95
        self._buf_pool_cfg = ""
        self._mem_pool_cfg = ""
        self._host_mem_pool_cfg = ""
        self._enable_cache_manager = None
        self._enable_remote_cache_accessible = None
        self._rdma_traffic_class = None
        self._rdma_service_level = None
        self._local_comm_res = None
        self._transfer_backend = None
        self._global_resource_config = None

    # -- properties with more than a type check --------------------------------------------

    @property
    def options(self) -> dict:
        return self._options

    @property
    def ge_options(self) -> dict:
        return self._ge_options

    @ge_options.setter
    def ge_options(self, ge_options):
        check_isinstance("ge_options", ge_options, dict)
        # None passed the check above; `.items()` then raises AttributeError (upstream).
        for key, value in ge_options.items():
            check_isinstance("key of ge_options", key, str, allow_none=False)
            check_isinstance(f"ge_options[{key}]", value, str, allow_none=False)
        self._ge_options = ge_options

    @property
    def device_id(self):
        return self._device_id

    @device_id.setter
    def device_id(self, device_id):
        check_isinstance("device_id", device_id, [list, tuple, int])
        if isinstance(device_id, (list, tuple)):
            check_isinstance("device_id", device_id, [list, tuple], int)
            ids = device_id
        else:
            ids = [device_id]
        # All sign checks before all range checks; `None >= 0` raises TypeError.
        for dev_id in ids:
            raise_if_false(dev_id >= 0, "device_id should be greater than or equal to zero.")
        for dev_id in ids:
            check_int32("device_id", dev_id)
        self._device_id = device_id

    @property
    def sync_kv_timeout(self):
        return self._sync_kv_timeout

    @sync_kv_timeout.setter
    def sync_kv_timeout(self, sync_kv_timeout):
        check_isinstance("sync_kv_timeout", sync_kv_timeout, [int, str])
        if isinstance(sync_kv_timeout, str):
            raise_if_false(sync_kv_timeout.isdigit(), "sync_kv_timeout must be digit.")
        millis = int(sync_kv_timeout)  # TypeError for None
        raise_if_false(millis > 0, "sync_kv_timeout should be greater than zero.")
        check_int32("sync_kv_timeout", millis)
        self._sync_kv_timeout = sync_kv_timeout

    @property
    def mem_utilization(self) -> float:
        return self._mem_utilization

    @mem_utilization.setter
    def mem_utilization(self, mem_utilization):
        check_isinstance("mem_utilization", mem_utilization, float)
        raise_if_false(0.0 <= mem_utilization <= 1.0,  # TypeError for None
                       "mem_utilization must be in range [0,1], current:%s", mem_utilization)
        self._mem_utilization = mem_utilization

    @property
    def cluster_info(self) -> str:
        return self._cluster_info

    @cluster_info.setter
    def cluster_info(self, cluster_info):
        check_isinstance("cluster_info", cluster_info, str)
        info = json.loads(cluster_info)  # TypeError for None, JSONDecodeError if malformed
        if "listen_ip_info" in info:
            for ip_info in info["listen_ip_info"]:
                ip_info["ip"] = ip_to_int(ip_info["ip"])
        self._cluster_info = json.dumps(info)

    @property
    def link_total_time(self) -> int:
        return 0 if self._link_total_time is None else self._link_total_time

    @link_total_time.setter
    def link_total_time(self, link_total_time):
        check_isinstance("link_total_time", link_total_time, int)
        raise_if_false(0 <= link_total_time <= _UINT32_MAX,
                       "link_total_time should be an integer between [0, 2^32-1], "
                       "given value is %s", link_total_time)
        self._link_total_time = link_total_time

    @property
    def link_retry_count(self) -> int:
        return 1 if self._link_retry_count is None else self._link_retry_count

    @link_retry_count.setter
    def link_retry_count(self, link_retry_count):
        check_isinstance("link_retry_count", link_retry_count, int)
        raise_if_false(1 <= link_retry_count <= 100,
                       "link_retry_count should be an integer between [1, 100], "
                       "given value is %s", link_retry_count)
        self._link_retry_count = link_retry_count

    @property
    def rdma_traffic_class(self):
        return self._rdma_traffic_class

    @rdma_traffic_class.setter
    def rdma_traffic_class(self, rdma_traffic_class):
        # Documented domain [0, 255] (multiple of 4) is not enforced upstream.
        check_uint32("rdma_traffic_class", rdma_traffic_class)
        self._rdma_traffic_class = rdma_traffic_class

    @property
    def rdma_service_level(self):
        return self._rdma_service_level

    @rdma_service_level.setter
    def rdma_service_level(self, rdma_service_level):
        # Documented domain [0, 7] is not enforced upstream.
        check_uint32("rdma_service_level", rdma_service_level)
        self._rdma_service_level = rdma_service_level

    # -- option generation -------------------------------------------------------------------

    def generate_options(self) -> dict:
        """Write the configured options into `self.options` and return that same dict."""
        return self.gen_options()

    def gen_options(self) -> dict:
        opts = self._options
        if self._ge_options:
            opts.update(self._ge_options)  # first, so explicit properties win
        if self._device_id is not None:
            if isinstance(self._device_id, int):
                opts["ge.exec.deviceId"] = str(self._device_id)
                opts["ge.session_device_id"] = str(self._device_id)
            else:  # an empty list raises IndexError here, as upstream
                opts["ge.session_device_id"] = str(self._device_id[0])
                opts["ge.exec.deviceId"] = ";".join(str(dev) for dev in self._device_id)
        if self._sync_kv_timeout is not None:
            opts["llm.SyncKvCacheWaitTime"] = str(self._sync_kv_timeout)
        if self._deploy_res_path:
            opts["llm.deployResPath"] = str(self._deploy_res_path)
        self._add_memory_options(opts)
        self._add_connect_options(opts)
        # Offline / v1 options.
        if self._cluster_info:
            opts["llm.ClusterInfo"] = str(self._cluster_info)
        if self._output_max_size is not None:
            opts["llm.OutputMaxSize"] = str(self._output_max_size)
        if self._enable_switch_role:
            opts["llm.EnableSwitchRole"] = "1"
        if self._mem_utilization is not None:
            opts["llm.MemoryUtilization"] = str(self._mem_utilization)
        return opts

    def _add_memory_options(self, opts: dict) -> None:
        if self._buf_pool_cfg:
            opts["llm.BufPoolCfg"] = str(self._buf_pool_cfg)
        if self._mem_pool_cfg:
            opts["llm.MemPoolConfig"] = str(self._mem_pool_cfg)
        if self._host_mem_pool_cfg:
            opts["llm.HostMemPoolConfig"] = str(self._host_mem_pool_cfg)
        # Flags are emitted once set, even to False: "0" overrides engine-side defaults.
        if self._enable_cache_manager is not None:
            opts["llm.EnableCacheManager"] = "1" if self._enable_cache_manager else "0"
        if self._enable_remote_cache_accessible is not None:
            opts["llm.EnableRemoteCacheAccessible"] = (
                "1" if self._enable_remote_cache_accessible else "0")

    def _add_connect_options(self, opts: dict) -> None:
        if self._listen_ip_info:
            opts["llm.listenIpInfo"] = str(self._listen_ip_info)
        optional = (
            ("llm.LinkTotalTime", self._link_total_time),
            ("llm.LinkRetryCount", self._link_retry_count),
            ("llm.RdmaTrafficClass", self._rdma_traffic_class),
            ("llm.RdmaServiceLevel", self._rdma_service_level),
            # Emitted even when "": presence alone switches engine defaults (§6.5).
            ("llm.LocalCommRes", self._local_comm_res),
            ("llm.TransferBackend", self._transfer_backend),
            ("llm.GlobalResourceConfig", self._global_resource_config),
        )
        for key, value in optional:
            if value is not None:
                opts[key] = str(value)


LlmConfig = LLMConfig
