"""KvCacheManager / KvCache, the v1 API (spec §21.1-21.4, §26.22)."""
import contextlib
import gc
import threading
import time

import pytest
import torch

from llm_datadist_torch import (BlocksCacheKey, Cache, CacheKey, DataType, KvCache, KvCacheManager,
                                LLMStatusCode, Placement, Tensor)
from helpers import desc, fill, pattern, raises_llm, raw, shm_files

pytestmark = pytest.mark.usefixtures("cpu_device")

PARAM = LLMStatusCode.LLM_PARAM_INVALID
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
TIMEOUT = LLMStatusCode.LLM_TIMEOUT
DEVICE, HOST = Placement.DEVICE, Placement.HOST
U8 = DataType.DT_UINT8


@pytest.fixture
def v1(v1_datadist):
    return v1_datadist


@pytest.fixture
def km(v1):
    return v1.kv_cache_manager


# ---- allocation and views ----------------------------------------------------------------------

def test_manager_type_and_state(v1, km):
    assert isinstance(km, KvCacheManager)
    assert km.is_initialized()
    assert v1._engine.pools == {}  # v1 needs no pool
    v1.finalize()
    assert not km.is_initialized()


def test_allocate_without_pool(v1, km):
    cache = km.allocate_cache(desc(3, [4, 10], DataType.DT_FLOAT16))
    assert isinstance(cache, KvCache)
    assert cache.cache_id == 1
    addrs = cache.per_device_tensor_addrs
    assert len(addrs) == 1 and len(addrs[0]) == 3 and len(set(addrs[0])) == 3
    assert repr(cache) == "KvCache(cache_id = 1, num_devices = 1)"
    written = fill(km, cache, 1)
    for index in range(3):
        views = km.get_cache_tensors(cache, index)
        assert isinstance(views, list) and len(views) == 1
        view = views[0]
        assert isinstance(view, Tensor)
        assert view.data_ptr() == addrs[0][index]
        assert view.shape == (4, 10) and view.dtype == torch.float16
        assert torch.equal(view.reshape(-1).view(torch.uint8), written[index])
    assert km.get_cache_tensors(cache)[0].data_ptr() == addrs[0][0]  # default index 0
    second = km.allocate_cache(desc(1, [8]))
    assert second.cache_id == 2


def test_views_alias_memory(km):
    cache = km.allocate_cache(desc(1, [2, 4], DataType.DT_INT32))
    a = km.get_cache_tensors(cache)[0]
    b = km.get_cache_tensors(cache)[0]
    a[1].copy_(torch.tensor([1, -2, 3, -4], dtype=torch.int32))
    assert torch.equal(b[1], torch.tensor([1, -2, 3, -4], dtype=torch.int32))


def test_allocate_with_keys_and_blocks_key(v1, km):
    cache = km.allocate_cache(desc(1, [2, 8]), [CacheKey(1, 10), CacheKey(1, 11)])
    blocks = km.allocate_blocks_cache(desc(1, [4, 8]), BlocksCacheKey(1, 3))
    assert blocks.is_blocks_cache and not cache.is_blocks_cache
    assert v1._engine.table.bound_keys() == {
        ("req", 10, 0): (cache.cache_id, 0), ("req", 11, 0): (cache.cache_id, 1),
        ("req", 2**64 - 1, 3): (blocks.cache_id, 0)}
    with raises_llm(PARAM):
        km.allocate_cache(desc(1, [2, 8]), [CacheKey(1, 10)])
    km.remove_cache_key(CacheKey(1, 10))
    km.remove_cache_key(CacheKey(1, 11))
    assert set(v1._engine.table.bound_keys()) == {("req", 2**64 - 1, 3)}


def test_argument_errors(km):
    cache = km.allocate_cache(desc(2, [2, 8]))
    with pytest.raises(TypeError):
        km.allocate_cache("desc")
    with pytest.raises(TypeError):
        km.allocate_cache(desc(1, [2]), CacheKey(1, 1))
    with raises_llm(PARAM):
        km.allocate_cache(desc(0, [2]))
    with raises_llm(PARAM):
        km.allocate_cache(desc(1, [0]))
    with pytest.raises(TypeError):
        km.get_cache_tensors("cache")
    with pytest.raises(TypeError):
        km.get_cache_tensors(None)
    memory = torch.zeros(16, dtype=torch.uint8)
    v2_handle = Cache(cache.cache_id, cache.cache_desc, [memory.data_ptr()], None, False, False)
    with pytest.raises(TypeError):
        km.get_cache_tensors(v2_handle)
    with pytest.raises(TypeError):
        km.get_cache_tensors(cache, "1")
    with pytest.raises(TypeError):
        km.get_cache_tensors(cache, 0.0)
    with pytest.raises(ValueError):
        km.get_cache_tensors(cache, 2)
    with pytest.raises(ValueError):
        km.get_cache_tensors(cache, -1)
    with pytest.raises(TypeError):
        km.deallocate_cache(v2_handle)
    with pytest.raises(TypeError):
        km.copy_cache(cache, v2_handle)
    with pytest.raises(TypeError):
        km.remove_cache_key(BlocksCacheKey(1, 1))


# ---- deallocation and garbage collection -------------------------------------------------------

def test_deallocate(v1, km):
    files = len(shm_files())
    cache = km.allocate_cache(desc(2, [4, 8]))
    assert len(shm_files()) == files + 1  # a v1 cache has its own memory block
    km.deallocate_cache(cache)
    assert cache.per_device_tensor_addrs == []
    assert len(shm_files()) == files
    assert v1._engine.table.entries() == []
    with raises_llm(NOT_EXIST):
        km.get_cache_tensors(cache)
    km.deallocate_cache(cache)  # double free: a no-op
    blocks = km.allocate_blocks_cache(desc(1, [4, 8]))
    with raises_llm(PARAM):
        km.deallocate_cache(blocks)
    km.deallocate_blocks_cache(blocks)
    assert v1._engine.table.entries() == []


def test_deallocate_with_keys_defers(v1, km):
    cache = km.allocate_cache(desc(1, [2, 8]), [CacheKey(1, 5)])
    km.deallocate_cache(cache)
    assert len(v1._engine.table.entries()) == 1  # kept for the key
    km.remove_cache_key(CacheKey(1, 5))
    assert v1._engine.table.entries() == []


def test_kv_cache_garbage_collection_frees_it(v1, km):
    files = len(shm_files())
    cache = km.allocate_cache(desc(2, [4, 8]))
    cache_id = cache.cache_id
    assert v1._engine.table.lookup_by_id(cache_id) is not None
    del cache
    gc.collect()
    assert v1._engine.table.lookup_by_id(cache_id) is None
    assert len(shm_files()) == files


def test_kv_cache_garbage_collection_with_live_view(v1, km):
    cache = km.allocate_cache(desc(1, [64]))
    view = km.get_cache_tensors(cache)[0]
    del cache
    gc.collect()
    assert v1._engine.table.entries() == []
    view.fill_(3)  # the pages live as long as the view (no crash)
    assert int(view.sum()) == 3 * 64


def test_kv_cache_garbage_collection_after_finalize(v1, km):
    cache = km.allocate_cache(desc(1, [8]))
    v1.finalize()
    del cache
    gc.collect()  # __del__ must not raise or touch the finalized engine


def test_cpu_kv_cache_is_never_freed(km):
    memory = torch.zeros(8, dtype=torch.uint8)
    cpu = KvCache.create_cpu_cache(desc(1, [1, 8], U8, HOST), [memory.data_ptr()])
    del cpu
    gc.collect()
    assert bool((memory == 0).all())


def test_after_finalize_every_call_is_llm_failed(v1, km):
    """§26.12: a stale KvCacheManager reports LLM_FAILED after its Python-side checks."""
    cache = km.allocate_cache(desc(1, [2, 8]), [CacheKey(1, 1)])
    blocks = km.allocate_blocks_cache(desc(1, [4, 8]))
    host = km.allocate_blocks_cache(desc(1, [4, 8], U8, HOST))
    v1.finalize()
    for call in (
            lambda: km.get_cache_tensors(cache),
            lambda: km.allocate_cache(desc(1, [8])),
            lambda: km.allocate_blocks_cache(desc(1, [4, 8])),
            lambda: km.deallocate_cache(cache),
            lambda: km.deallocate_blocks_cache(blocks),
            lambda: km.remove_cache_key(CacheKey(1, 1)),
            lambda: km.copy_cache(cache, cache),
            lambda: km.copy_blocks(blocks, {0: [1]}),
            lambda: km.swap_blocks(blocks, host, {0: 0}),
    ):
        with raises_llm(LLMStatusCode.LLM_FAILED):
            call()
    with pytest.raises(TypeError):  # argument checks still run first
        km.allocate_cache("desc")
    with raises_llm(PARAM):
        km.copy_cache(blocks, cache)


# ---- copy / swap -------------------------------------------------------------------------------

def test_copy_cache(km):
    src = km.allocate_cache(desc(2, [4, 16]))
    dst = km.allocate_cache(desc(2, [4, 16]))
    src_data = fill(km, src, 1)
    dst_data = fill(km, dst, 30)
    km.copy_cache(dst, src, 1, 2, offset=3, size=9)
    km.copy_cache(dst, src, 3, 0)
    for t in range(2):
        expected = dst_data[t].clone()
        expected[19:28] = src_data[t][35:44]
        expected[48:64] = src_data[t][0:16]
        assert torch.equal(raw(km, dst, t), expected)
    with raises_llm(PARAM):
        km.copy_cache(dst, src, 4, 0)
    with pytest.raises(ValueError):
        km.copy_cache(dst, src, -1)


def test_copy_blocks(km):
    cache = km.allocate_blocks_cache(desc(2, [4, 8]))
    data = [d.view(4, 8) for d in fill(km, cache, 2)]
    km.copy_blocks(cache, {0: [1], 1: [2]})
    for t in range(2):
        expected = data[t].clone()
        expected[1] = data[t][0]
        expected[2] = data[t][0]
        assert torch.equal(raw(km, cache, t).view(4, 8), expected)
    with raises_llm(PARAM):
        km.copy_blocks(cache, {0: [4]})


def test_swap_blocks_between_v1_caches(km):
    device = km.allocate_blocks_cache(desc(2, [4, 16], DataType.DT_FLOAT16, DEVICE))
    host = km.allocate_blocks_cache(desc(2, [3, 16], DataType.DT_FLOAT16, HOST))
    device_data = [d.view(4, 32) for d in fill(km, device, 3)]
    host_data = [d.view(3, 32) for d in fill(km, host, 9)]
    km.swap_blocks(device, host, {3: 0, 0: 2})
    km.swap_blocks(host, device, {1: 1})
    for t in range(2):
        expected_host = host_data[t].clone()
        expected_host[0] = device_data[t][3]
        expected_host[2] = device_data[t][0]
        assert torch.equal(raw(km, host, t).view(3, 32), expected_host)
        expected_device = device_data[t].clone()
        expected_device[1] = host_data[t][1]
        assert torch.equal(raw(km, device, t).view(4, 32), expected_device)
    with raises_llm(PARAM):
        km.swap_blocks(device, device, {0: 1})


@pytest.mark.parametrize("nested", [False, True])
def test_swap_blocks_with_cpu_cache(km, nested):
    device = km.allocate_blocks_cache(desc(2, [4, 16], U8, DEVICE))
    device_data = [d.view(4, 16) for d in fill(km, device, 4)]
    memory = torch.zeros(2, 4, 16, dtype=torch.uint8)
    addrs = [memory[0].data_ptr(), memory[1].data_ptr()]
    cpu = KvCache.create_cpu_cache(desc(2, [4, 16], U8, HOST), [addrs] if nested else addrs)
    assert cpu.cache_id == -1 and cpu.per_device_tensor_addrs == [addrs]
    km.swap_blocks(device, cpu, {0: 3, 2: 1})
    for t in range(2):
        expected = torch.zeros(4, 16, dtype=torch.uint8)
        expected[3] = device_data[t][0]
        expected[1] = device_data[t][2]
        assert torch.equal(memory[t], expected)
    memory.copy_(torch.stack([pattern(64, 50).view(4, 16), pattern(64, 51).view(4, 16)]))
    km.swap_blocks(cpu, device, {2: 2})
    for t in range(2):
        expected = device_data[t].clone()
        expected[2] = memory[t][2]
        assert torch.equal(raw(km, device, t).view(4, 16), expected)


def test_create_cpu_cache_forms():
    host = desc(2, [1, 8], U8, HOST)
    flat = KvCache.create_cpu_cache(host, [0x10, 0x20])
    assert flat.per_device_tensor_addrs == [[0x10, 0x20]] and flat.cache_id == -1
    nested = KvCache.create_cpu_cache(host, [[0x10, 0x20], [0x30, 0x40]])
    assert nested.per_device_tensor_addrs == [[0x10, 0x20], [0x30, 0x40]]
    assert repr(nested) == "KvCache(cache_id = -1, num_devices = 2)"
    with pytest.raises(TypeError):
        KvCache.create_cpu_cache("desc", [1, 2])
    with pytest.raises(TypeError):
        KvCache.create_cpu_cache(None, [1, 2])
    with raises_llm(PARAM):
        KvCache.create_cpu_cache(desc(2, [1, 8], U8, DEVICE), [1, 2])
    with raises_llm(PARAM):  # placement is checked before the addresses
        KvCache.create_cpu_cache(desc(2, [1, 8], U8, DEVICE), "not a list")
    with pytest.raises(TypeError):
        KvCache.create_cpu_cache(host, (1, 2))
    with pytest.raises(TypeError):
        KvCache.create_cpu_cache(host, None)
    with raises_llm(PARAM):
        KvCache.create_cpu_cache(host, [])
    with pytest.raises(TypeError):
        KvCache.create_cpu_cache(host, ["1", "2"])
    with pytest.raises(TypeError):
        KvCache.create_cpu_cache(host, [[1, "2"]])
    with raises_llm(PARAM):
        KvCache.create_cpu_cache(host, [[1, 2, 3]])
    with raises_llm(PARAM):
        KvCache.create_cpu_cache(host, [[1, 2], 3])
    with raises_llm(PARAM):
        KvCache.create_cpu_cache(host, [1, 2, 3])
    with pytest.raises(ValueError):
        KvCache(2**63, host, [[1, 2]], None)
    with pytest.raises(TypeError):
        KvCache("1", host, [[1, 2]], None)


# ---- get_cache_tensors waits for an in-flight write --------------------------------------------

@contextlib.contextmanager
def writer_holding(engine, entry, hold_s):
    """Pin `entry` as written by another thread for `hold_s` seconds (or until released)."""
    started, stop = threading.Event(), threading.Event()

    def hold():
        with engine.table.pinned([], [entry]):
            started.set()
            stop.wait(hold_s)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert started.wait(5)
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def short_wait_cache(make_v1_datadist):
    """`(manager, cache, engine, entry)`: a 16-byte cache of a v1 instance whose sync_kv_timeout
    is 200 ms, with its engine and its table entry."""
    datadist = make_v1_datadist(sync_kv_timeout=200)
    manager = datadist.kv_cache_manager
    cache = manager.allocate_cache(desc(1, [16]))
    engine = datadist._engine
    return manager, cache, engine, engine.table.get(cache.cache_id)


def test_get_cache_tensors_times_out_on_a_long_write(short_wait_cache):
    manager, cache, engine, entry = short_wait_cache
    with writer_holding(engine, entry, hold_s=5):
        start = time.monotonic()
        with raises_llm(TIMEOUT):
            manager.get_cache_tensors(cache)
        elapsed = time.monotonic() - start
    assert 0.18 <= elapsed < 2.0
    assert manager.get_cache_tensors(cache)[0].numel() == 16  # fine once the write is done


def test_get_cache_tensors_waits_for_a_short_write(short_wait_cache):
    manager, cache, engine, entry = short_wait_cache
    with writer_holding(engine, entry, hold_s=0.05):
        start = time.monotonic()
        view = manager.get_cache_tensors(cache)[0]
        elapsed = time.monotonic() - start
    assert 0.03 <= elapsed < 0.2
    assert view.data_ptr() == cache.per_device_tensor_addrs[0][0]


def test_readers_do_not_block_get_cache_tensors(short_wait_cache):
    manager, cache, engine, entry = short_wait_cache
    with engine.table.pinned([entry]):  # a copy reading from the cache
        start = time.monotonic()
        manager.get_cache_tensors(cache)
        assert time.monotonic() - start < 0.1


def test_v2_get_cache_tensors_times_out_too(make_datadist):
    datadist = make_datadist(sync_kv_timeout=200)
    manager = datadist.cache_manager
    cache = manager.allocate_cache(desc(1, [16]))
    engine = datadist._engine
    with writer_holding(engine, engine.table.get(cache.cache_id), hold_s=5):
        with raises_llm(TIMEOUT):
            manager.get_cache_tensors(cache)
