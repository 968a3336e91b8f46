"""LLMConfig and LLMClusterInfo (spec §6, §7, §27 #28-31)."""
import json

import pytest

from llm_datadist_torch.configs import (LLMClusterInfo, LLMConfig, LlmConfig, ip_int_to_str,
                                        ip_to_int)
from llm_datadist_torch.enums import LLMRole
from llm_datadist_torch.status import LLMStatusCode
from helpers import raises_llm

PARAM = LLMStatusCode.LLM_PARAM_INVALID
DEFAULT_OPTIONS = {"llm.MemoryUtilization": "0.95"}


def options_after(**props):
    config = LLMConfig()
    for name, value in props.items():
        setattr(config, name, value)
    return config.generate_options()


# -- construction, getters, generate_options basics ------------------------------------------

def test_alias_is_same_class():
    assert LlmConfig is LLMConfig


def test_initial_getters():
    c = LLMConfig()
    assert c.options == {}
    assert c.listen_ip_info == ""
    assert c.device_id is None
    assert c.sync_kv_timeout is None
    assert c.deploy_res_path == ""
    assert c.ge_options == {}
    assert c.enable_switch_role is False
    assert c.link_total_time == 0
    assert c.link_retry_count == 1
    assert c.cluster_info == ""
    assert c.output_max_size is None
    assert c.mem_utilization == 0.95
    assert c.buf_pool_cfg == ""
    assert c.mem_pool_cfg == ""
    assert c.host_mem_pool_cfg == ""
    assert c.enable_cache_manager is False
    assert c.enable_remote_cache_accessible is False
    assert c.rdma_traffic_class is None
    assert c.rdma_service_level is None
    assert c.local_comm_res == ""
    assert c.transfer_backend == ""
    assert c.global_resource_config == ""


def test_default_options_only_memory_utilization():
    assert LLMConfig().generate_options() == DEFAULT_OPTIONS


def test_generate_returns_internal_dict_and_accumulates():
    c = LLMConfig()
    first = c.generate_options()
    assert first is c.options
    assert c.gen_options() is first
    c.listen_ip_info = "127.0.0.1:26000"
    c.generate_options()
    assert first["llm.listenIpInfo"] == "127.0.0.1:26000"
    c.listen_ip_info = None  # unset afterwards: the key stays
    assert c.generate_options()["llm.listenIpInfo"] == "127.0.0.1:26000"


def test_spec_example():
    c = LLMConfig()
    c.device_id = 0
    c.enable_cache_manager = True
    c.mem_pool_cfg = '{"memory_size": 102428800}'
    assert c.generate_options() == {
        "ge.exec.deviceId": "0", "ge.session_device_id": "0",
        "llm.MemPoolConfig": '{"memory_size": 102428800}',
        "llm.EnableCacheManager": "1", "llm.MemoryUtilization": "0.95"}


def test_ge_options_merged_first_and_overridden():
    c = LLMConfig()
    c.ge_options = {"ge.exec.deviceId": "7", "llm.listenIpInfo": "x", "ge.flowGraphMemMaxSize": "9"}
    c.device_id = 1
    c.listen_ip_info = "1.2.3.4:5"
    opts = c.generate_options()
    assert opts["ge.exec.deviceId"] == "1"
    assert opts["llm.listenIpInfo"] == "1.2.3.4:5"
    assert opts["ge.flowGraphMemMaxSize"] == "9"
    assert c.ge_options == {"ge.exec.deviceId": "7", "llm.listenIpInfo": "x",
                            "ge.flowGraphMemMaxSize": "9"}


def test_full_config_every_key():
    c = LLMConfig()
    c.device_id = 3
    c.sync_kv_timeout = "1500"
    c.deploy_res_path = "/res"
    c.buf_pool_cfg = "{}"
    c.mem_pool_cfg = "m"
    c.host_mem_pool_cfg = "h"
    c.enable_cache_manager = False
    c.enable_remote_cache_accessible = True
    c.listen_ip_info = "10.0.0.1:26000"
    c.link_total_time = 10
    c.link_retry_count = 3
    c.rdma_traffic_class = 132
    c.rdma_service_level = 4
    c.local_comm_res = ""
    c.transfer_backend = "hixl"
    c.global_resource_config = "{}"
    c.cluster_info = '{"cluster_id": 0}'
    c.output_max_size = 1024
    c.enable_switch_role = True
    c.mem_utilization = 0.5
    assert c.generate_options() == {
        "ge.exec.deviceId": "3", "ge.session_device_id": "3",
        "llm.SyncKvCacheWaitTime": "1500", "llm.deployResPath": "/res",
        "llm.BufPoolCfg": "{}", "llm.MemPoolConfig": "m", "llm.HostMemPoolConfig": "h",
        "llm.EnableCacheManager": "0", "llm.EnableRemoteCacheAccessible": "1",
        "llm.listenIpInfo": "10.0.0.1:26000", "llm.LinkTotalTime": "10",
        "llm.LinkRetryCount": "3", "llm.RdmaTrafficClass": "132", "llm.RdmaServiceLevel": "4",
        "llm.LocalCommRes": "", "llm.TransferBackend": "hixl", "llm.GlobalResourceConfig": "{}",
        "llm.ClusterInfo": '{"cluster_id": 0}', "llm.OutputMaxSize": "1024",
        "llm.EnableSwitchRole": "1", "llm.MemoryUtilization": "0.5"}


# -- device_id (#28) ---------------------------------------------------------------------------

def test_conformance_28_device_id_list_and_tuple():
    opts = options_after(device_id=[0, 1])
    assert opts["ge.exec.deviceId"] == "0;1"
    assert opts["ge.session_device_id"] == "0"
    opts = options_after(device_id=(2, 3))
    assert opts["ge.exec.deviceId"] == "2;3"
    assert opts["ge.session_device_id"] == "2"


def test_device_id_int():
    c = LLMConfig()
    c.device_id = 5
    assert c.device_id == 5
    opts = c.generate_options()
    assert opts["ge.exec.deviceId"] == "5" and opts["ge.session_device_id"] == "5"


@pytest.mark.parametrize("value", ["0", 1.0, {0: 1}, [0, "1"], (0, None), None])
def test_device_id_type_errors(value):
    c = LLMConfig()
    with pytest.raises(TypeError):
        c.device_id = value
    assert c.device_id is None


@pytest.mark.parametrize("value", [-1, [0, -1], (-2,)])
def test_device_id_negative(value):
    with raises_llm():
        LLMConfig().device_id = value


@pytest.mark.parametrize("value", [2**31, [0, 2**31]])
def test_device_id_int32(value):
    with pytest.raises(ValueError):
        LLMConfig().device_id = value


def test_device_id_sign_checked_before_range():
    with raises_llm():
        LLMConfig().device_id = [2**31, -1]


def test_device_id_empty_list_fails_in_generate():
    c = LLMConfig()
    c.device_id = []
    with pytest.raises(IndexError):
        c.generate_options()


# -- sync_kv_timeout ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,emitted", [
    (1000, "1000"), ("2000", "2000"), (2**31 - 1, str(2**31 - 1))])
def test_sync_kv_timeout_ok(value, emitted):
    c = LLMConfig()
    c.sync_kv_timeout = value
    assert c.sync_kv_timeout == value
    assert c.generate_options()["llm.SyncKvCacheWaitTime"] == emitted


@pytest.mark.parametrize("value", ["abc", "-5", "1.5", "", 0, "0", -1])
def test_sync_kv_timeout_param(value):
    with raises_llm():
        LLMConfig().sync_kv_timeout = value


@pytest.mark.parametrize("value", [2**31, "2147483648"])
def test_sync_kv_timeout_int32(value):
    with pytest.raises(ValueError):
        LLMConfig().sync_kv_timeout = value


@pytest.mark.parametrize("value", [1.5, None, [1]])
def test_sync_kv_timeout_type(value):
    with pytest.raises(TypeError):
        LLMConfig().sync_kv_timeout = value


# -- ge_options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["x", [("a", "b")], {1: "a"}, {"a": 1}, {"a": None}])
def test_ge_options_type_errors(value):
    c = LLMConfig()
    with pytest.raises(TypeError):
        c.ge_options = value
    assert c.ge_options == {}


def test_ge_options_none_is_attribute_error():
    with pytest.raises(AttributeError):
        LLMConfig().ge_options = None


def test_ge_options_empty_not_merged():
    c = LLMConfig()
    c.ge_options = {}
    assert c.generate_options() == DEFAULT_OPTIONS


# -- simple string / int / bool options --------------------------------------------------------

STRING_OPTIONS = [
    ("listen_ip_info", "llm.listenIpInfo", "127.0.0.1:26000"),
    ("deploy_res_path", "llm.deployResPath", "/path"),
    ("buf_pool_cfg", "llm.BufPoolCfg", '{"buf_cfg": []}'),
    ("mem_pool_cfg", "llm.MemPoolConfig", '{"memory_size": 1024}'),
    ("host_mem_pool_cfg", "llm.HostMemPoolConfig", '{"memory_size": 1024}'),
]


@pytest.mark.parametrize("prop,key,value", STRING_OPTIONS)
def test_string_options(prop, key, value):
    c = LLMConfig()
    setattr(c, prop, value)
    assert getattr(c, prop) == value
    assert c.generate_options()[key] == value
    empty = LLMConfig()
    setattr(empty, prop, "")  # empty is "unset"
    assert key not in empty.generate_options()


@pytest.mark.parametrize("prop,key,value", STRING_OPTIONS)
def test_string_options_type_error(prop, key, value):
    with pytest.raises(TypeError, match="only support"):
        setattr(LLMConfig(), prop, 1)


@pytest.mark.parametrize("prop,key,value", STRING_OPTIONS)
def test_string_options_none_unsets(prop, key, value):
    c = LLMConfig()
    setattr(c, prop, None)
    assert getattr(c, prop) is None  # not the initial ""
    assert key not in c.generate_options()


def test_output_max_size():
    assert options_after(output_max_size=4096)["llm.OutputMaxSize"] == "4096"
    with pytest.raises(TypeError):
        LLMConfig().output_max_size = "1"
    c = LLMConfig()
    c.output_max_size = None
    assert c.output_max_size is None
    assert "llm.OutputMaxSize" not in c.generate_options()


def test_enable_switch_role():
    assert options_after(enable_switch_role=True)["llm.EnableSwitchRole"] == "1"
    assert "llm.EnableSwitchRole" not in options_after(enable_switch_role=False)
    with pytest.raises(TypeError):
        LLMConfig().enable_switch_role = 1
    c = LLMConfig()
    c.enable_switch_role = None
    assert c.enable_switch_role is None
    assert "llm.EnableSwitchRole" not in c.generate_options()


@pytest.mark.parametrize("prop,key", [
    ("enable_cache_manager", "llm.EnableCacheManager"),
    ("enable_remote_cache_accessible", "llm.EnableRemoteCacheAccessible"),
])
def test_conformance_31_bool_flags(prop, key):
    assert key not in options_after()
    assert options_after(**{prop: False})[key] == "0"
    assert options_after(**{prop: True})[key] == "1"
    c = LLMConfig()
    setattr(c, prop, True)
    assert getattr(c, prop) is True
    setattr(c, prop, None)
    assert getattr(c, prop) is False
    assert key not in LLMConfig().generate_options()
    for bad in (1, 0, "1"):
        with pytest.raises(TypeError):
            setattr(c, prop, bad)


# -- mem_utilization (#29) ---------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.5, 0.0, 1.0])
def test_conformance_29_mem_utilization_ok(value):
    c = LLMConfig()
    c.mem_utilization = value
    assert c.mem_utilization == value
    assert c.generate_options()["llm.MemoryUtilization"] == str(value)


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_conformance_29_mem_utilization_range(value):
    c = LLMConfig()
    with raises_llm():
        c.mem_utilization = value
    assert c.mem_utilization == 0.95


@pytest.mark.parametrize("value", [1, 0, "0.5", None])
def test_mem_utilization_type(value):
    with pytest.raises(TypeError):
        LLMConfig().mem_utilization = value


# -- cluster_info --------------------------------------------------------------------------------

def test_cluster_info_converts_ips():
    c = LLMConfig()
    c.cluster_info = json.dumps({"cluster_id": 1, "logic_device_id": ["0:0:0:0"],
                                 "listen_ip_info": [{"ip": "1.2.3.4", "port": 26000},
                                                    {"ip": 16777343, "port": 26001}]})
    info = json.loads(c.cluster_info)
    assert info["listen_ip_info"] == [{"ip": 0x04030201, "port": 26000},
                                      {"ip": 16777343, "port": 26001}]
    assert info["cluster_id"] == 1
    assert c.generate_options()["llm.ClusterInfo"] == c.cluster_info


def test_cluster_info_without_listen_ips():
    c = LLMConfig()
    c.cluster_info = '{"cluster_id": 2}'
    assert json.loads(c.cluster_info) == {"cluster_id": 2}


def test_cluster_info_errors():
    with pytest.raises(TypeError):
        LLMConfig().cluster_info = 1
    with pytest.raises(TypeError):
        LLMConfig().cluster_info = None
    with pytest.raises(json.JSONDecodeError):
        LLMConfig().cluster_info = "{not json"
    with pytest.raises(ValueError):  # JSONDecodeError is a ValueError
        LLMConfig().cluster_info = ""
    with pytest.raises(RuntimeError) as info:
        LLMConfig().cluster_info = '{"listen_ip_info": [{"ip": "1.2.3", "port": 1}, {"ip": "x"}]}'
    assert type(info.value) is RuntimeError


# -- link timing ---------------------------------------------------------------------------------

def test_link_total_time():
    c = LLMConfig()
    assert "llm.LinkTotalTime" not in c.generate_options()
    c.link_total_time = 0
    assert c.generate_options()["llm.LinkTotalTime"] == "0"
    c.link_total_time = 2**32 - 1
    assert c.link_total_time == 2**32 - 1
    for bad in (-1, 2**32):
        with raises_llm():
            c.link_total_time = bad
    for bad in ("1", 1.0, None):
        with pytest.raises(TypeError):
            c.link_total_time = bad
    assert c.link_total_time == 2**32 - 1


def test_link_retry_count():
    c = LLMConfig()
    assert "llm.LinkRetryCount" not in c.generate_options()
    for ok in (1, 100):
        c.link_retry_count = ok
        assert c.generate_options()["llm.LinkRetryCount"] == str(ok)
    for bad in (0, 101, -1):
        with raises_llm():
            c.link_retry_count = bad
    for bad in ("2", 2.0, None):
        with pytest.raises(TypeError):
            c.link_retry_count = bad


# -- rdma ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prop,key", [("rdma_traffic_class", "llm.RdmaTrafficClass"),
                                      ("rdma_service_level", "llm.RdmaServiceLevel")])
def test_rdma_options(prop, key):
    assert key not in options_after()
    assert options_after(**{prop: 100})[key] == "100"  # documented domain not enforced
    assert options_after(**{prop: 2**32 - 1})[key] == str(2**32 - 1)
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            setattr(LLMConfig(), prop, bad)
    for bad in ("1", 1.0, None):
        with pytest.raises(TypeError):
            setattr(LLMConfig(), prop, bad)


# -- local_comm_res / transfer_backend / global_resource_config (#30) ----------------------

@pytest.mark.parametrize("prop,key", [("local_comm_res", "llm.LocalCommRes"),
                                      ("transfer_backend", "llm.TransferBackend"),
                                      ("global_resource_config", "llm.GlobalResourceConfig")])
def test_explicitly_set_strings(prop, key):
    assert key not in options_after()
    assert options_after(**{prop: ""})[key] == ""
    assert options_after(**{prop: "hixl"})[key] == "hixl"
    c = LLMConfig()
    setattr(c, prop, "v")
    setattr(c, prop, None)
    assert getattr(c, prop) == ""
    assert key not in c.generate_options()


@pytest.mark.parametrize("value", [123, {"a": 1}, [1]])
def test_conformance_30_global_resource_config_type(value):
    with pytest.raises(TypeError):
        LLMConfig().global_resource_config = value


def test_conformance_30_global_resource_config_presence():
    assert "llm.GlobalResourceConfig" not in LLMConfig().generate_options()
    c = LLMConfig()
    c.global_resource_config = ""
    assert c.generate_options()["llm.GlobalResourceConfig"] == ""


@pytest.mark.parametrize("prop", ["local_comm_res", "transfer_backend"])
def test_local_comm_res_and_backend_type(prop):
    with pytest.raises(TypeError):
        setattr(LLMConfig(), prop, 1)


def test_options_is_read_only():
    with pytest.raises(AttributeError):
        LLMConfig().options = {}


# -- LLMClusterInfo ----------------------------------------------------------------------------

def test_cluster_info_initial_state():
    info = LLMClusterInfo()
    assert info.remote_cluster_id is None
    assert info.remote_role_type is None
    assert info.local_ip_info_list == []
    assert info.remote_ip_info_list == []


def test_remote_cluster_id():
    info = LLMClusterInfo()
    info.remote_cluster_id = 2**64 - 1
    assert info.remote_cluster_id == 2**64 - 1
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            info.remote_cluster_id = bad
    for bad in ("1", None, 1.0):
        with pytest.raises(TypeError):
            info.remote_cluster_id = bad
    assert info.remote_cluster_id == 2**64 - 1


def test_remote_role_type():
    info = LLMClusterInfo()
    info.remote_role_type = LLMRole.DECODER
    assert info.remote_role_type is LLMRole.DECODER
    info.remote_role_type = 42  # no range check
    assert info.remote_role_type == 42
    info.remote_role_type = None
    assert info.remote_role_type is None
    with pytest.raises(TypeError):
        info.remote_role_type = "PROMPT"


@pytest.mark.parametrize("method,attr", [("append_local_ip_info", "local_ip_info_list"),
                                         ("append_remote_ip_info", "remote_ip_info_list")])
def test_append_ip_info(method, attr):
    info = LLMClusterInfo()
    getattr(info, method)("1.2.3.4", 26000)
    getattr(info, method)(0x0100007F, 0)
    getattr(info, method)("127.0.0.1", 65535)
    assert getattr(info, attr) == [(0x04030201, 26000), (0x0100007F, 0), (0x0100007F, 65535)]
    with pytest.raises(TypeError):
        getattr(info, method)(1.5, 1)
    with pytest.raises(TypeError):
        getattr(info, method)(b"1.2.3.4", 1)
    with pytest.raises(ValueError):
        getattr(info, method)("1.2.3.4", 65536)
    with pytest.raises(ValueError):
        getattr(info, method)("1.2.3.4", -1)
    with pytest.raises(TypeError):
        getattr(info, method)("1.2.3.4", "80")
    with pytest.raises(TypeError):
        getattr(info, method)("1.2.3.4", None)
    for bad_ip in ("::1", "1.2.3.256", "host", "", "1.2.3.4\x00"):
        with pytest.raises(RuntimeError) as err:
            getattr(info, method)(bad_ip, 1)
        assert type(err.value) is RuntimeError
    assert len(getattr(info, attr)) == 3


def test_port_checked_before_ip_parse():
    with pytest.raises(ValueError):
        LLMClusterInfo().append_local_ip_info("::1", 70000)


def test_ip_lists_are_read_only():
    info = LLMClusterInfo()
    with pytest.raises(AttributeError):
        info.local_ip_info_list = []
    with pytest.raises(AttributeError):
        info.remote_ip_info_list = []


def test_ip_helpers():
    assert ip_to_int("1.2.3.4") == 0x04030201
    assert ip_to_int(7) == 7
    assert ip_int_to_str(0x04030201) == "1.2.3.4"
    for text in ("127.0.0.1", "10.20.30.40", "255.255.255.255", "0.0.0.0"):
        assert ip_int_to_str(ip_to_int(text)) == text
    with pytest.raises(ValueError):
        ip_int_to_str(2**32)
    with pytest.raises(ValueError):
        ip_int_to_str(-1)
    with pytest.raises(TypeError):
        ip_int_to_str("1.2.3.4")
