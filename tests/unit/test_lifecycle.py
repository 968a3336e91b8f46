"""LLMDataDist lifecycle, option validation and shm hygiene (spec §8.1-8.4, §6.4, §26.1, §26.12)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from llm_datadist_torch import (BlocksCacheKey, Cache, CacheDesc, CacheKey, CacheManager, DataType,
                                KvCacheManager, LLMConfig, LLMDataDist, LLMRole, LLMStatusCode,
                                MemInfo, Memtype, Placement)
from llm_datadist_torch.control.host import free_port
from helpers import SHM_DIR, raises_llm, shm_files

pytestmark = pytest.mark.usefixtures("cpu_device", "no_shm_leak")

PARAM = LLMStatusCode.LLM_PARAM_INVALID
FAILED = LLMStatusCode.LLM_FAILED
POOL = json.dumps({"memory_size": 1 << 20, "page_shift": 12})


def v2_options(**extra):
    options = {"llm.EnableCacheManager": "1", "ge.exec.deviceId": "0", "llm.MemPoolConfig": POOL}
    options.update(extra)
    return options


def assert_not_initialized(instance):
    with pytest.raises(RuntimeError, match="not initialized"):
        instance.cache_manager
    with pytest.raises(RuntimeError, match="not initialized"):
        instance.kv_cache_manager


# ---- init / finalize ---------------------------------------------------------------------------

def test_init_from_llm_config(make_datadist):
    datadist = make_datadist()
    manager = datadist.cache_manager
    assert isinstance(manager, CacheManager)
    assert datadist.cache_manager is manager
    assert LLMDataDist.llm_engine_instance is datadist
    cache = manager.allocate_cache(CacheDesc(1, [2, 8], DataType.DT_INT32, Placement.DEVICE))
    assert cache.cache_id == 1
    view = manager.get_cache_tensors(cache)[0]
    view.copy_(torch.arange(16, dtype=torch.int32).view(2, 8))
    assert torch.equal(manager.get_cache_tensors(cache)[0].flatten(), torch.arange(16, dtype=torch.int32))


def pool_files():
    """This process's arena files, without the fence table every live engine shares."""
    return [name for name in shm_files() if ".fence." not in name]


def test_init_from_hand_written_dict(instances):
    datadist = instances()
    datadist.init({"llm.EnableCacheManager": "1", "ge.exec.deviceId": "0",
                   "llm.HostMemPoolConfig": '{"memory_size": 65536, "page_shift": 10}'})
    manager = datadist.cache_manager
    cache = manager.allocate_cache(CacheDesc(2, [4, 4], DataType.DT_UINT8, Placement.HOST))
    assert len(cache.tensor_addrs) == 2
    with raises_llm(PARAM, match="memory pool"):  # no device pool configured
        manager.allocate_cache(CacheDesc(1, [4], DataType.DT_UINT8, Placement.DEVICE))
    assert len(pool_files()) == 1


def test_init_without_device_id_defaults_to_device_0_in_v2(instances):
    datadist = instances()
    datadist.init({"llm.EnableCacheManager": "1"})
    assert datadist._engine.options.device_id == 0
    assert pool_files() == []  # no pool, no arena


def test_init_twice_is_a_no_op(instances):
    datadist = instances()
    datadist.init(v2_options())
    manager = datadist.cache_manager
    cache = manager.allocate_cache(CacheDesc(1, [4], DataType.DT_UINT8, Placement.DEVICE))
    files = shm_files()
    datadist.init({"garbage": object()})  # options are ignored entirely
    datadist.init("not even a dict")
    assert datadist.cache_manager is manager
    assert shm_files() == files
    assert manager.get_cache_tensors(cache)[0].numel() == 4


def test_finalize_is_idempotent_and_a_no_op_before_init(instances):
    datadist = instances()
    datadist.finalize()  # never initialized
    datadist.init(v2_options())
    datadist.finalize()
    datadist.finalize()
    assert LLMDataDist.llm_engine_instance is not datadist
    assert_not_initialized(datadist)


def test_init_again_after_finalize_restarts_ids(instances):
    datadist = instances()
    datadist.init(v2_options())
    first_manager = datadist.cache_manager
    desc = CacheDesc(1, [4], DataType.DT_UINT8, Placement.DEVICE)
    assert [first_manager.allocate_cache(desc).cache_id for _ in range(3)] == [1, 2, 3]
    datadist.finalize()
    datadist.init(v2_options())
    manager = datadist.cache_manager
    assert manager is not first_manager
    assert manager.allocate_cache(desc).cache_id == 1
    assert LLMDataDist.llm_engine_instance is datadist


def test_two_instances_at_once(instances):
    prompt, decoder = instances(LLMRole.PROMPT), instances(LLMRole.DECODER)
    prompt.init(v2_options())
    decoder.init(v2_options())  # a second initialized instance is allowed here
    assert LLMDataDist.llm_engine_instance is decoder
    desc = CacheDesc(1, [16], DataType.DT_UINT8, Placement.DEVICE)
    a = prompt.cache_manager.allocate_cache(desc)
    b = decoder.cache_manager.allocate_cache(desc)
    assert a.cache_id == b.cache_id == 1  # one id counter per engine
    prompt.cache_manager.get_cache_tensors(a)[0].fill_(0x11)
    decoder.cache_manager.get_cache_tensors(b)[0].fill_(0x22)
    assert a.tensor_addrs[0] != b.tensor_addrs[0]
    assert bool((prompt.cache_manager.get_cache_tensors(a)[0] == 0x11).all())
    assert bool((decoder.cache_manager.get_cache_tensors(b)[0] == 0x22).all())
    assert len(pool_files()) == 2
    prompt.finalize()
    assert len(pool_files()) == 1
    assert bool((decoder.cache_manager.get_cache_tensors(b)[0] == 0x22).all())


# ---- manager accessors -------------------------------------------------------------------------

def test_managers_before_init_raise_runtime_error(instances):
    assert_not_initialized(instances())


def test_kv_cache_manager_in_v2_mode_raises_param(instances):
    datadist = instances()
    datadist.init(v2_options())
    with raises_llm(PARAM):
        datadist.kv_cache_manager


def test_cache_manager_in_v1_mode_raises_param(instances):
    datadist = instances(LLMRole.DECODER)
    datadist.init({"ge.exec.deviceId": "0"})
    assert isinstance(datadist.kv_cache_manager, KvCacheManager)
    assert datadist.kv_cache_manager is datadist.kv_cache_manager
    with raises_llm(PARAM):
        datadist.cache_manager


def test_managers_after_finalize_raise_runtime_error(instances):
    datadist = instances()
    datadist.init(v2_options())
    datadist.finalize()
    assert_not_initialized(datadist)


def test_constructor_checks():
    with pytest.raises(TypeError):
        LLMDataDist(0, 1)
    with pytest.raises(TypeError):
        LLMDataDist(LLMRole.PROMPT, "1")
    with pytest.raises(ValueError):
        LLMDataDist(LLMRole.PROMPT, -1)
    assert LLMDataDist(LLMRole.MIX, 2**64 - 1).cluster_id == 2**64 - 1


# ---- option validation (§8.2, §8.2.1) ----------------------------------------------------------

def test_options_must_be_a_dict(instances):
    datadist = instances()
    with pytest.raises(TypeError):
        datadist.init([("llm.EnableCacheManager", "1")])
    assert_not_initialized(datadist)


@pytest.mark.parametrize("value, error", [
    (123, TypeError), ("1024,2048", PARAM), ("1.23", PARAM), ("-1", PARAM), ("", PARAM)])
def test_flow_graph_mem_max_size(instances, value, error):
    datadist = instances()
    options = v2_options(**{"ge.flowGraphMemMaxSize": value})
    if error is TypeError:
        with pytest.raises(TypeError):
            datadist.init(options)
    else:
        with raises_llm(error):
            datadist.init(options)
    assert_not_initialized(datadist)


def test_flow_graph_mem_max_size_digits_accepted(instances):
    datadist = instances()
    datadist.init(v2_options(**{"ge.flowGraphMemMaxSize": "1024"}))
    assert datadist.cache_manager is not None


def test_local_comm_res_needs_cache_manager(instances):
    datadist = instances()
    with raises_llm(PARAM):
        datadist.init({"ge.exec.deviceId": "0", "llm.LocalCommRes": "", "llm.EnableCacheManager": "0"})
    assert_not_initialized(datadist)


def test_local_comm_res_presence_selects_cache_manager_mode(instances):
    datadist = instances()
    datadist.init({"ge.exec.deviceId": "0", "llm.LocalCommRes": ""})
    assert isinstance(datadist.cache_manager, CacheManager)
    assert datadist._engine.options.remote_accessible is True


def _backend_config(**props):
    config = LLMConfig()
    config.device_id = 0
    for name, value in props.items():
        setattr(config, name, value)
    return config.generate_options()


def test_transfer_backend_needs_cache_manager(instances):
    datadist = instances()
    options = _backend_config(transfer_backend="hixl", listen_ip_info=f"127.0.0.1:{free_port()}")
    with raises_llm(PARAM, match="EnableCacheManager"):
        datadist.init(options)
    assert_not_initialized(datadist)


def test_transfer_backend_needs_listen_ip_info(instances):
    datadist = instances()
    options = _backend_config(transfer_backend="hixl", enable_cache_manager=True)
    with raises_llm(PARAM, match="listenIpInfo"):
        datadist.init(options)
    assert_not_initialized(datadist)


def test_transfer_backend_needs_remote_cache_accessible(instances):
    datadist = instances()
    options = _backend_config(transfer_backend="hixl", enable_cache_manager=True,
                              enable_remote_cache_accessible=False,
                              listen_ip_info=f"127.0.0.1:{free_port()}")
    with raises_llm(PARAM, match="EnableRemoteCacheAccessible"):
        datadist.init(options)
    assert_not_initialized(datadist)


@pytest.mark.parametrize("backend", ["hixl", "auto", "local", "shm", "cma", "mooncake"])
def test_transfer_backend_accepted_values(instances, backend):
    datadist = instances()
    datadist.init(_backend_config(transfer_backend=backend, enable_cache_manager=True,
                                  listen_ip_info=f"127.0.0.1:{free_port()}"))
    options = datadist._engine.options
    assert options.transfer_backend == backend
    assert options.remote_accessible is True  # defaulted to "1" by the backend rule


@pytest.mark.parametrize("backend", ["", "HIXL", "tcp"])
def test_transfer_backend_rejected_values(instances, backend):
    datadist = instances()
    with raises_llm(PARAM):
        datadist.init(_backend_config(transfer_backend=backend, enable_cache_manager=True,
                                      listen_ip_info=f"127.0.0.1:{free_port()}"))
    assert_not_initialized(datadist)


def test_listen_ip_info_parsed(instances):
    datadist = instances()
    port = free_port()
    datadist.init(v2_options(**{"llm.listenIpInfo": f"127.0.0.1:{port}"}))
    assert datadist._engine.options.listen == ("127.0.0.1", port)


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:1:2", ""])
def test_listen_ip_info_wrong_shape(instances, text):
    datadist = instances()
    with raises_llm(PARAM):
        datadist.init(v2_options(**{"llm.listenIpInfo": text}))
    assert_not_initialized(datadist)


def test_listen_ip_info_non_numeric_port(instances):
    datadist = instances()
    with pytest.raises(ValueError):
        datadist.init(v2_options(**{"llm.listenIpInfo": "127.0.0.1:port"}))
    assert_not_initialized(datadist)


@pytest.mark.parametrize("key, value", [
    ("ge.exec.deviceId", "0;1"),
    ("ge.exec.deviceId", "x"),
    ("ge.exec.deviceId", "-1"),
    ("llm.EnableCacheManager", "true"),
    ("llm.EnableRemoteCacheAccessible", "2"),
    ("llm.SyncKvCacheWaitTime", ""),
    ("llm.SyncKvCacheWaitTime", "1.5"),
    ("llm.SyncKvCacheWaitTime", "-5"),
    ("llm.RdmaTrafficClass", "abc"),
    ("llm.RdmaServiceLevel", str(2**32)),
    ("llm.LinkTotalTime", str(2**31)),
    ("llm.LinkRetryCount", "0"),
    ("llm.LinkRetryCount", "101"),
])
def test_engine_option_rules(instances, key, value):
    datadist = instances()
    with raises_llm(PARAM):
        datadist.init(v2_options(**{key: value}))
    assert_not_initialized(datadist)
    assert shm_files() == []


def test_engine_option_rules_accept_valid_values(instances):
    datadist = instances()
    datadist.init(v2_options(**{"llm.SyncKvCacheWaitTime": "250", "llm.RdmaTrafficClass": "132",
                                "llm.RdmaServiceLevel": "100", "llm.LinkTotalTime": str(2**31 - 1),
                                "llm.LinkRetryCount": "100", "llm.EnableRemoteCacheAccessible": "0",
                                "llm.MemoryUtilization": "0.95", "ge.session_device_id": "0"}))
    options = datadist._engine.options
    assert options.sync_kv_timeout_ms == 250
    assert options.remote_accessible is False


def test_v1_options(instances):
    datadist = instances(LLMRole.DECODER)
    with raises_llm(PARAM):  # v1 needs ge.exec.deviceId
        datadist.init({})
    with raises_llm(LLMStatusCode.LLM_FEATURE_NOT_ENABLED):
        datadist.init({"ge.exec.deviceId": "0;1"})
    prompt = instances(LLMRole.PROMPT)
    with raises_llm(PARAM, match="listenIp"):  # a v1 PROMPT must listen
        prompt.init({"ge.exec.deviceId": "0"})
    assert_not_initialized(datadist)
    assert_not_initialized(prompt)


# ---- pool JSON (§6.4) --------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["llm.MemPoolConfig", "llm.HostMemPoolConfig"])
@pytest.mark.parametrize("text", [
    "",
    "not json",
    "[]",
    '{"page_shift": 16}',
    '{"memory_size": -1}',
    '{"memory_size": 1048576.0}',
    '{"memory_size": "1048576"}',
    '{"memory_size": 1048576, "page_shift": 9}',
    '{"memory_size": 1048576, "page_shift": 31}',
    '{"memory_size": 1048576, "page_shift": "12"}',
    '{"memory_size": 4095, "page_shift": 12}',
    '{"memory_size": %d, "page_shift": 10}' % (1 << 42),
])
def test_pool_json_errors(instances, key, text):
    datadist = instances()
    options = {"llm.EnableCacheManager": "1", "ge.exec.deviceId": "0", key: text}
    with raises_llm(PARAM):
        datadist.init(options)
    assert_not_initialized(datadist)
    assert shm_files() == []


def test_host_pool_over_20_gb_rejected(instances):
    datadist = instances()
    with raises_llm(PARAM):
        datadist.init({"llm.EnableCacheManager": "1",
                       "llm.HostMemPoolConfig": json.dumps({"memory_size": 20 * 10**9 + 4096})})
    assert shm_files() == []


def test_pool_page_shift_rounds_allocations(instances):
    datadist = instances()
    datadist.init({"llm.EnableCacheManager": "1",
                   "llm.MemPoolConfig": json.dumps({"memory_size": 1 << 16, "page_shift": 10})})
    pool = datadist._engine.pools[Placement.DEVICE]
    assert pool.allocator.free_bytes == 1 << 16
    datadist.cache_manager.allocate_cache(CacheDesc(3, [1], DataType.DT_UINT8, Placement.DEVICE))
    assert pool.allocator.free_bytes == (1 << 16) - 3 * 1024


def test_default_page_shift_is_16(instances):
    datadist = instances()
    datadist.init({"llm.EnableCacheManager": "1", "llm.MemPoolConfig": '{"memory_size": 262144}'})
    pool = datadist._engine.pools[Placement.DEVICE]
    datadist.cache_manager.allocate_cache(CacheDesc(1, [1], DataType.DT_UINT8, Placement.DEVICE))
    assert pool.allocator.free_bytes == 262144 - 65536


# ---- a stale CacheManager after finalize (§8.3, §26.12) ----------------------------------------

def test_stale_cache_manager_after_finalize(instances):
    datadist = instances()
    datadist.init(v2_options(**{"llm.HostMemPoolConfig": POOL}))
    manager = datadist.cache_manager
    desc = CacheDesc(1, [4, 16], DataType.DT_UINT8, Placement.DEVICE)
    blocks_desc = CacheDesc(1, [4, 16], DataType.DT_UINT8, Placement.DEVICE)
    cache = manager.allocate_cache(desc, [CacheKey(1, 1)])
    blocks = manager.allocate_blocks_cache(blocks_desc)
    memory = torch.zeros(64, dtype=torch.uint8)
    host_blocks = Cache.create_cpu_cache(CacheDesc(1, [4, 16], DataType.DT_UINT8, Placement.HOST),
                                         [memory.data_ptr()])
    datadist.finalize()

    # Python-side checks still run first.
    with pytest.raises(TypeError):
        manager.allocate_cache("desc")
    with pytest.raises(TypeError):
        manager.copy_cache(cache, "src")
    with raises_llm(PARAM):  # num_tensors == 0 is a Python-side check
        manager.allocate_cache(CacheDesc(0, [4], DataType.DT_UINT8, Placement.DEVICE))

    for call in (
            lambda: manager.register_cache(desc, [memory.data_ptr()]),
            lambda: manager.register_blocks_cache(blocks_desc, [memory.data_ptr()]),
            lambda: manager.allocate_cache(desc),
            lambda: manager.allocate_blocks_cache(blocks_desc, BlocksCacheKey(1, 0)),
            lambda: manager.unregister_cache(1),
    ):
        with raises_llm(FAILED):
            call()
    for call in (
            lambda: manager.deallocate_cache(cache),
            lambda: manager.deallocate_blocks_cache(blocks),
            lambda: manager.remove_cache_key(CacheKey(1, 1)),
            lambda: manager.copy_cache(cache, cache),
            lambda: manager.copy_blocks(blocks, {0: [1]}),
            lambda: manager.swap_blocks(blocks, host_blocks, {0: 0}),
            lambda: manager.remap_registered_memory(MemInfo(Memtype.MEM_TYPE_DEVICE, 4096, 16)),
            lambda: manager.get_cache_tensors(cache, 0),
    ):
        with raises_llm(PARAM):
            call()
    assert bool((memory == 0).all())
    assert cache.tensor_addrs != []  # the handle was never deallocated


# ---- shared-memory files -----------------------------------------------------------------------

def test_shm_files_removed_at_finalize(instances):
    datadist = instances()
    datadist.init(v2_options(**{"llm.HostMemPoolConfig": POOL}))
    files = pool_files()
    assert len(files) == 2
    for name in files:
        stat = os.stat(os.path.join(SHM_DIR, name))
        assert stat.st_size == 1 << 20
        assert stat.st_mode & 0o777 == 0o600
    fence_files = [name for name in shm_files() if name not in files]
    assert len(fence_files) == 1
    assert os.stat(os.path.join(SHM_DIR, fence_files[0])).st_mode & 0o777 == 0o600
    datadist.finalize()
    assert shm_files() == []  # the fence table goes with the last engine


def test_views_outlive_finalize_without_crash(instances):
    datadist = instances()
    datadist.init(v2_options())
    manager = datadist.cache_manager
    cache = manager.allocate_cache(CacheDesc(1, [64], DataType.DT_UINT8, Placement.DEVICE))
    view = manager.get_cache_tensors(cache)[0]
    view.fill_(7)
    datadist.finalize()
    assert shm_files() == []  # the file is gone, the pages live while the view does
    view.fill_(9)
    assert int(view.sum()) == 9 * 64
    del view


def test_file_of_dead_process_is_swept_in_its_pid_namespace_only(instances):
    """A file named for a dead pid of our pid namespace goes; the same pid in another
    namespace (a container sharing /dev/shm) may be a live process there: left alone."""
    from llm_datadist_torch.memory.arena import PID_NAMESPACE
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    dead_pid = child.pid
    stale = os.path.join(SHM_DIR, f"llm_datadist_torch.{dead_pid}.{PID_NAMESPACE}.device.0.beef")
    foreign = os.path.join(SHM_DIR, f"llm_datadist_torch.{dead_pid}.1{PID_NAMESPACE}.device.0.beef")
    for path in (stale, foreign):
        with open(path, "wb") as handle:
            handle.write(b"\0" * 4096)
    try:
        datadist = instances()
        datadist.init(v2_options())
        assert not os.path.exists(stale)
        assert os.path.exists(foreign)
    finally:
        for path in (stale, foreign):
            if os.path.exists(path):
                os.unlink(path)


def test_files_of_other_prefixes_are_left_alone(instances):
    other = os.path.join(SHM_DIR, "not_llm_datadist_torch.1.x.y")
    with open(other, "wb"):
        pass
    try:
        datadist = instances()
        datadist.init(v2_options())
        assert os.path.exists(other)
    finally:
        os.unlink(other)


# ---- device resolution (§26.1) -----------------------------------------------------------------

def test_device_env_cpu(instances, monkeypatch):
    monkeypatch.setenv("LLM_DATADIST_TORCH_DEVICE", "cpu")
    datadist = instances()
    datadist.init(v2_options())
    assert datadist._engine.device == torch.device("cpu")
    manager = datadist.cache_manager
    cache = manager.allocate_cache(CacheDesc(1, [4], DataType.DT_FLOAT, Placement.DEVICE))
    assert manager.get_cache_tensors(cache)[0].device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_device_env_cuda_without_gpu(instances, monkeypatch, value):
    monkeypatch.setenv("LLM_DATADIST_TORCH_DEVICE", value)
    datadist = instances()
    with raises_llm(PARAM):
        datadist.init(v2_options())
    assert_not_initialized(datadist)
    assert shm_files() == []


def test_device_env_garbage(instances, monkeypatch):
    monkeypatch.setenv("LLM_DATADIST_TORCH_DEVICE", "no-such-device")
    datadist = instances()
    with raises_llm(PARAM):
        datadist.init(v2_options())
    assert_not_initialized(datadist)
