"""CacheManager (v2), every method, byte-exact (spec §9-10, §14, §15.0-15.9, §15.15-15.19, §27)."""
import contextlib
import ctypes
import mmap

import pytest
import torch

from llm_datadist_torch import (BlocksCacheKey, Cache, CacheKey, DataType, KvCache, LLMStatusCode,
                                MemInfo, Memtype, Placement)
from llm_datadist_torch.data_type import to_torch_dtype
from helpers import desc, fill, pattern, raises_llm, raw

pytestmark = pytest.mark.usefixtures("cpu_device")

PARAM = LLMStatusCode.LLM_PARAM_INVALID
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
NOT_ENABLED = LLMStatusCode.LLM_FEATURE_NOT_ENABLED
DEVICE_OOM = LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY
HOST_OOM = LLMStatusCode.LLM_OUT_OF_MEMORY
INVALID_ID = 2**64 - 1
DEVICE, HOST = Placement.DEVICE, Placement.HOST
U8 = DataType.DT_UINT8
PAGE = 4096
POOL_BYTES = 4 << 20

# ---- helpers -----------------------------------------------------------------------------------


def snapshot(manager, cache):
    return [raw(manager, cache, i).clone() for i in range(cache.cache_desc.num_tensors)]


def engine_of(datadist):
    return datadist._engine


def free_bytes(datadist, placement=DEVICE) -> int:
    return engine_of(datadist).pools[placement].allocator.free_bytes


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_NORESERVE = 0x4000


@contextlib.contextmanager
def raw_mapping(nbytes, prot=mmap.PROT_READ | mmap.PROT_WRITE, extra_flags=0):
    addr = _libc.mmap(None, nbytes, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | extra_flags, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), "mmap failed"
    try:
        yield addr
    finally:
        _libc.munmap(addr, nbytes)


@pytest.fixture
def dd(make_datadist):
    return make_datadist(mem_pool=POOL_BYTES, host_pool=POOL_BYTES)


@pytest.fixture
def cm(dd):
    return dd.cache_manager


# ---- register_cache (§15.2) --------------------------------------------------------------------

def test_conformance_2_register_ids_start_at_1(cm):
    a = torch.zeros(2, 4, dtype=torch.int8)
    b = torch.zeros(2, 4, dtype=torch.int8)
    first = cm.register_cache(desc(1, [2, 4], DataType.DT_INT8), [a.data_ptr()])
    assert first.cache_id == 1
    second = cm.register_blocks_cache(desc(1, [2, 4], DataType.DT_INT8), [b.data_ptr()],
                                      BlocksCacheKey(1, 100))
    assert second.cache_id == 2
    assert second.is_blocks_cache and not first.is_blocks_cache


@pytest.mark.parametrize("placement", [DEVICE, HOST])
def test_register_cache_views_alias_caller_memory(dd, cm, placement):
    memory = torch.zeros(2, 3, 8, dtype=torch.float32)
    addrs = [memory[0].data_ptr(), memory[1].data_ptr()]
    cache_desc = desc(2, [3, 8], DataType.DT_FLOAT, placement)
    cache = cm.register_cache(cache_desc, addrs)
    assert cache.tensor_addrs == addrs
    assert cache.cache_desc is cache_desc
    assert not cache.is_blocks_cache
    views = cache.tensors
    assert [v.data_ptr() for v in views] == addrs
    assert all(v.shape == (3, 8) and v.dtype == torch.float32 for v in views)
    views[1].copy_(torch.arange(24, dtype=torch.float32).view(3, 8))
    assert torch.equal(memory[1], torch.arange(24, dtype=torch.float32).view(3, 8))
    memory[0].fill_(2.5)
    assert bool((cm.get_cache_tensors(cache, 0)[0] == 2.5).all())
    # DEVICE registrations default to remote accessible (counted), HOST ones do not.
    expected = 2 if placement == DEVICE else 0
    assert engine_of(dd).registry.address_count() == expected


def test_conformance_32_host_cache_remote_accessible(dd, cm):
    memory = torch.zeros(64, dtype=torch.uint8)
    cache = cm.register_cache(desc(1, [4, 16], U8, HOST), [memory.data_ptr()], remote_accessible=True)
    assert engine_of(dd).registry.address_count() == 1
    assert engine_of(dd).registry.registered_bytes(False) == 64
    raw(cm, cache).fill_(3)
    assert bool((memory == 3).all())


def test_register_misaligned_address(cm):
    memory = torch.zeros(40, dtype=torch.uint8)
    addr = memory.data_ptr() + 2
    cache = cm.register_cache(desc(1, [2, 4], DataType.DT_FLOAT), [addr])
    view = cm.get_cache_tensors(cache)[0]
    assert view.data_ptr() == addr and view.shape == (2, 4) and view.dtype == torch.float32
    view.fill_(1.0)
    expected = torch.tensor([1.0] * 8, dtype=torch.float32).view(torch.uint8)
    assert torch.equal(memory[2:34], expected)
    assert bool((memory[:2] == 0).all()) and bool((memory[34:] == 0).all())


def test_register_cache_type_errors(cm):
    memory = torch.zeros(16, dtype=torch.uint8)
    addr = memory.data_ptr()
    good = desc(1, [16])
    with pytest.raises(TypeError):
        cm.register_cache("desc", [addr])
    with pytest.raises(TypeError):
        cm.register_cache(good, (addr,))  # a tuple is rejected
    with pytest.raises(TypeError):
        cm.register_cache(good, [str(addr)])
    with pytest.raises(TypeError):
        cm.register_cache(good, [addr], CacheKey(1, 1))
    with pytest.raises(TypeError):
        cm.register_cache(good, [addr], [BlocksCacheKey(1, 1)])
    with pytest.raises(TypeError):
        cm.register_cache(good, [addr], remote_accessible=1)
    with pytest.raises(TypeError):  # None addrs fail at len()
        cm.register_cache(good, None)
    with pytest.raises(AttributeError):  # None desc passes the type check (§26.21)
        cm.register_cache(None, [addr])


def test_register_cache_param_errors(dd, cm):
    memory = torch.zeros(64, dtype=torch.uint8)
    addr = memory.data_ptr()
    with raises_llm(PARAM):
        cm.register_cache(desc(1, [16]), [])
    with raises_llm(PARAM):
        cm.register_cache(desc(2, [16]), [addr])
    with raises_llm(PARAM):
        cm.register_cache(desc(1, [16]), [0])
    with raises_llm(PARAM):
        cm.register_cache(desc(2, [16]), [addr, 0])
    with raises_llm(PARAM):  # a zero dimension
        cm.register_cache(desc(1, [0, 16]), [addr])
    with raises_llm(PARAM):  # 32 dimensions
        cm.register_cache(desc(1, [1] * 32), [addr])
    assert engine_of(dd).registry.address_count() == 0
    assert engine_of(dd).table.entries() == []
    assert cm.register_cache(desc(1, [1] * 31), [addr]).cache_desc.num_tensors == 1


@pytest.mark.parametrize("remote_accessible, placement", [
    (None, DEVICE), (True, HOST), (False, HOST), (False, DEVICE)])
def test_register_bogus_addresses(dd, cm, remote_accessible, placement):
    with raw_mapping(PAGE, prot=mmap.PROT_READ) as read_only:
        with raises_llm(PARAM):
            cm.register_cache(desc(1, [64], U8, placement), [read_only],
                              remote_accessible=remote_accessible)
    unmapped = _libc.mmap(None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    _libc.munmap(unmapped, PAGE)
    with raises_llm(PARAM):
        cm.register_cache(desc(1, [64], U8, placement), [unmapped], remote_accessible=remote_accessible)
    with raises_llm(PARAM):
        cm.register_cache(desc(1, [64], U8, placement), [0x1000], remote_accessible=remote_accessible)
    with raw_mapping(2 * PAGE) as base:  # the range runs past the end of the mapping
        _libc.munmap(base + PAGE, PAGE)
        with raises_llm(PARAM):
            cm.register_cache(desc(1, [2 * PAGE], U8, placement), [base],
                              remote_accessible=remote_accessible)
        cm.register_cache(desc(1, [PAGE], U8, placement), [base], remote_accessible=remote_accessible)
    assert len(engine_of(dd).table.entries()) == 1


def test_register_blocks_cache_bogus_address(cm):
    with raises_llm(PARAM):
        cm.register_blocks_cache(desc(1, [4, 16]), [0x1000], BlocksCacheKey(1, 0))
    assert engine_of_cm(cm).table.bound_keys() == {}


def engine_of_cm(manager):
    return manager._engine


def test_register_overlapping_ranges(dd, cm):
    memory = torch.zeros(256, dtype=torch.uint8)
    base = memory.data_ptr()
    cm.register_cache(desc(1, [64]), [base + 64])
    with raises_llm(PARAM, match="overlap"):  # starts inside
        cm.register_cache(desc(1, [64]), [base + 96])
    with raises_llm(PARAM, match="overlap"):  # ends inside
        cm.register_cache(desc(1, [64]), [base + 16])
    with raises_llm(PARAM, match="overlap"):  # covers it
        cm.register_cache(desc(1, [128]), [base + 32])
    with raises_llm(PARAM, match="overlap"):  # overlap inside one registration
        cm.register_cache(desc(2, [64]), [base + 128, base + 160])
    assert engine_of(dd).registry.address_count() == 1
    cm.register_cache(desc(2, [64]), [base, base + 128])  # adjacent on both sides is fine
    assert engine_of(dd).registry.address_count() == 3


def test_register_240_address_limit(dd, cm):
    memory = torch.zeros(241 * 64, dtype=torch.uint8)
    addrs = [memory.data_ptr() + i * 64 for i in range(241)]
    full = cm.register_cache(desc(240, [64]), addrs[:240])
    with raises_llm(PARAM):
        cm.register_cache(desc(1, [64]), addrs[240:])
    # Only remote-accessible registrations count.
    local = cm.register_cache(desc(1, [64]), addrs[240:], remote_accessible=False)
    assert engine_of(dd).registry.address_count() == 240
    cm.unregister_cache(local.cache_id)
    cm.unregister_cache(full.cache_id)
    assert engine_of(dd).registry.address_count() == 0
    cm.register_cache(desc(1, [64]), addrs[240:])
    cm.register_blocks_cache(desc(239, [1, 64]), addrs[:239])
    with raises_llm(PARAM):  # register_blocks_cache counts too
        cm.register_blocks_cache(desc(1, [1, 64]), addrs[239:240])


GB = 10**9


def test_register_byte_limits(dd, cm):
    with raw_mapping(52 * GB, extra_flags=MAP_NORESERVE) as base:
        with raises_llm(PARAM):  # 52 GB of device memory > 50 GB
            cm.register_cache(desc(2, [26 * GB]), [base, base + 26 * GB])
        with raises_llm(PARAM):  # 21 GB of host memory > 20 GB
            cm.register_cache(desc(1, [21 * GB], U8, HOST), [base], remote_accessible=True)
        # Within the limits; nothing is touched by registration.
        cache = cm.register_cache(desc(2, [25 * GB]), [base, base + 25 * GB])
        assert engine_of(dd).registry.registered_bytes(True) == 50 * GB
        cm.unregister_cache(cache.cache_id)
        assert engine_of(dd).registry.registered_bytes(True) == 0


def test_register_byte_limits_lifted_by_env(make_datadist, monkeypatch):
    monkeypatch.setenv("LLM_DATADIST_TORCH_STRICT_LIMITS", "0")
    manager = make_datadist().cache_manager
    memory = torch.zeros(241 * 8, dtype=torch.uint8)
    manager.register_cache(desc(241, [8]), [memory.data_ptr() + 8 * i for i in range(241)])
    with raw_mapping(52 * GB, extra_flags=MAP_NORESERVE) as base:
        cache = manager.register_cache(desc(2, [26 * GB]), [base, base + 26 * GB])
        manager.unregister_cache(cache.cache_id)


def test_register_cache_keys(dd, cm):
    memory = torch.zeros(3, 16, dtype=torch.uint8)
    keys = [CacheKey(1, INVALID_ID, 0), CacheKey(1, INVALID_ID, 0), CacheKey(1, 42)]
    cache = cm.register_cache(desc(1, [3, 16]), [memory.data_ptr()], keys)  # padding unchecked
    assert engine_of(dd).table.bound_keys() == {("req", 42, 0): (cache.cache_id, 2)}
    # remove_cache_key on a registered cache's key is a no-op: the key stays bound.
    cm.remove_cache_key(CacheKey(7, 42))
    assert ("req", 42, 0) in engine_of(dd).table.bound_keys()


def test_register_cache_key_already_bound_changes_nothing(dd, cm):
    engine = engine_of(dd)
    allocated = cm.allocate_cache(desc(1, [2, 16]), [CacheKey(1, 5)])
    memory = torch.zeros(2, 16, dtype=torch.uint8)
    bound = engine.table.bound_keys()
    count = engine.registry.address_count()
    with raises_llm(PARAM):
        cm.register_cache(desc(1, [2, 16]), [memory.data_ptr()], [CacheKey(9, 5)])
    with raises_llm(PARAM):  # duplicates inside one registration
        cm.register_cache(desc(1, [2, 16]), [memory.data_ptr()], [CacheKey(1, 6), CacheKey(2, 6)])
    with raises_llm(PARAM):  # more keys than batch slots
        cm.register_cache(desc(1, [2, 16]), [memory.data_ptr()],
                          [CacheKey(1, 7), CacheKey(1, 8), CacheKey(1, 9)])
    assert engine.table.bound_keys() == bound
    assert engine.registry.address_count() == count
    assert [e.cache_id for e in engine.table.entries()] == [allocated.cache_id]
    # The memory was not left registered: it can be registered now.
    again = cm.register_cache(desc(1, [2, 16]), [memory.data_ptr()], [CacheKey(1, 6)])
    assert again.cache_id == allocated.cache_id + 4  # failed calls consumed ids


def test_register_blocks_cache(dd, cm):
    memory = torch.zeros(2, 4, 16, dtype=torch.uint8)
    cache_desc = desc(2, [4, 16])
    assert cache_desc._is_blocks is False
    cache = cm.register_blocks_cache(cache_desc, [memory[0].data_ptr(), memory[1].data_ptr()],
                                     BlocksCacheKey(1, 3))
    assert cache_desc._is_blocks is True  # mutates the caller's object (§9.4)
    assert cache.is_blocks_cache
    assert engine_of(dd).table.bound_keys() == {("req", INVALID_ID, 3): (cache.cache_id, 0)}
    raw(cm, cache, 1).copy_(pattern(64, 1))
    assert torch.equal(memory[1].flatten(), pattern(64, 1))
    # A newer registration with the same blocks key wins (§14.2).
    other = torch.zeros(2, 4, 16, dtype=torch.uint8)
    newer = cm.register_blocks_cache(desc(2, [4, 16]), [other[0].data_ptr(), other[1].data_ptr()],
                                     BlocksCacheKey(1, 3))
    assert engine_of(dd).table.bound_keys() == {("req", INVALID_ID, 3): (newer.cache_id, 0)}
    assert raw(cm, cache, 1).data_ptr() == memory[1].data_ptr()  # the old cache still exists


def test_register_blocks_cache_errors(cm):
    memory = torch.zeros(64, dtype=torch.uint8)
    addr = memory.data_ptr()
    with pytest.raises(TypeError):
        cm.register_blocks_cache("desc", [addr])
    with pytest.raises(TypeError):
        cm.register_blocks_cache(desc(1, [4, 16]), (addr,))
    with pytest.raises(TypeError):
        cm.register_blocks_cache(desc(1, [4, 16]), [addr], CacheKey(1, 1))
    with pytest.raises(TypeError):
        cm.register_blocks_cache(desc(1, [4, 16]), [addr], remote_accessible="yes")
    with pytest.raises(TypeError):  # negative blocks key ids are rejected by the binding (§26.21)
        cm.register_blocks_cache(desc(1, [4, 16]), [addr], BlocksCacheKey(1, -1))
    with raises_llm(PARAM):
        cm.register_blocks_cache(desc(1, [4, 16]), [])
    with raises_llm(PARAM):
        cm.register_blocks_cache(desc(2, [4, 16]), [addr])
    with raises_llm(PARAM):
        cm.register_blocks_cache(desc(1, [4, 16]), [0])
    with pytest.raises(AttributeError):
        cm.register_blocks_cache(None, [addr])


# ---- unregister_cache (§15.4) ------------------------------------------------------------------

def test_unregister_cache_leaves_caller_memory_untouched(dd, cm):
    memory = pattern(128, 9).view(2, 64).clone()
    before = memory.clone()
    cache = cm.register_cache(desc(2, [64]), [memory[0].data_ptr(), memory[1].data_ptr()],
                              [CacheKey(1, 77)])
    cm.unregister_cache(cache.cache_id)
    assert torch.equal(memory, before)
    with raises_llm(NOT_EXIST):
        cm.get_cache_tensors(cache, 0)
    assert engine_of(dd).registry.address_count() == 0
    assert engine_of(dd).table.bound_keys() == {}
    # Memory and key are free again.
    again = cm.register_cache(desc(2, [64]), [memory[0].data_ptr(), memory[1].data_ptr()],
                              [CacheKey(1, 77)])
    assert raw(cm, again, 1).data_ptr() == memory[1].data_ptr()
    assert torch.equal(memory, before)


def test_unregister_cache_arguments(cm):
    with pytest.raises(TypeError):
        cm.unregister_cache("1")
    with pytest.raises(TypeError):
        cm.unregister_cache(1.0)
    with pytest.raises(TypeError):
        cm.unregister_cache(None)
    with pytest.raises(ValueError):
        cm.unregister_cache(2**63)
    cm.unregister_cache(12345)  # unknown ids succeed silently
    cm.unregister_cache(-1)


def test_unregister_allocated_cache_frees_it(dd, cm):
    full = free_bytes(dd)
    cache = cm.allocate_cache(desc(2, [2, PAGE]), [CacheKey(1, 1), CacheKey(1, 2)])
    assert free_bytes(dd) == full - 4 * PAGE
    cm.unregister_cache(cache.cache_id)
    assert free_bytes(dd) == full
    assert engine_of(dd).table.bound_keys() == {}
    cm.deallocate_cache(cache)  # already gone: a no-op


# ---- allocate_cache (§15.5) --------------------------------------------------------------------

@pytest.mark.parametrize("placement", [DEVICE, HOST])
def test_allocate_cache(dd, cm, placement):
    full = free_bytes(dd, placement)
    cache_desc = desc(3, [4, 100], DataType.DT_FLOAT16, placement)
    cache = cm.allocate_cache(cache_desc)
    assert cache.cache_id == 1 and not cache.is_blocks_cache
    assert cache.cache_desc is cache_desc
    assert len(cache.tensor_addrs) == 3 and len(set(cache.tensor_addrs)) == 3
    assert free_bytes(dd, placement) == full - 3 * PAGE  # 800 bytes round up to a page each
    written = fill(cm, cache, 1)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(cm, cache), written))
    views = cache.tensors
    assert [v.data_ptr() for v in views] == cache.tensor_addrs
    assert all(v.shape == (4, 100) and v.dtype == torch.float16 for v in views)
    assert cm.allocate_cache(desc(1, [1], U8, placement)).cache_id == 2


def test_allocate_cache_tensors_are_disjoint(cm):
    a = cm.allocate_cache(desc(2, [PAGE + 1]))
    b = cm.allocate_cache(desc(2, [10]))
    written_a = fill(cm, a, 10)
    written_b = fill(cm, b, 20)
    assert all(torch.equal(x, y) for x, y in zip(snapshot(cm, a), written_a))
    assert all(torch.equal(x, y) for x, y in zip(snapshot(cm, b), written_b))


def test_allocate_cache_argument_errors(dd, cm):
    with pytest.raises(TypeError):
        cm.allocate_cache("desc")
    with pytest.raises(TypeError):
        cm.allocate_cache(desc(1, [2, 4]), CacheKey(1, 1))
    with pytest.raises(TypeError):
        cm.allocate_cache(desc(1, [2, 4]), [1, 2])
    with pytest.raises(AttributeError):
        cm.allocate_cache(None)
    with raises_llm(PARAM):
        cm.allocate_cache(desc(0, [2, 4]))
    with raises_llm(PARAM):
        cm.allocate_cache(desc(1, [2, 0]))
    with raises_llm(PARAM):
        cm.allocate_cache(desc(1, [1] * 32))
    with raises_llm(PARAM):
        cm.allocate_cache(desc(1, [2**40, 2**40]))  # size does not fit int64
    assert free_bytes(dd) == POOL_BYTES
    assert engine_of(dd).table.entries() == []


def test_allocate_without_matching_pool(make_datadist):
    only_host = make_datadist(mem_pool=None, host_pool=1 << 20).cache_manager
    with raises_llm(PARAM, match="memory pool"):
        only_host.allocate_cache(desc(1, [4], U8, DEVICE))
    with raises_llm(PARAM, match="memory pool"):
        only_host.allocate_blocks_cache(desc(1, [4], U8, DEVICE))
    only_host.allocate_cache(desc(1, [4], U8, HOST))
    only_device = make_datadist(mem_pool=1 << 20, host_pool=None).cache_manager
    with raises_llm(PARAM, match="memory pool"):
        only_device.allocate_cache(desc(1, [4], U8, HOST))
    only_device.allocate_cache(desc(1, [4], U8, DEVICE))


@pytest.mark.parametrize("placement, code", [(DEVICE, DEVICE_OOM), (HOST, HOST_OOM)])
def test_pool_exhausted_leaks_nothing(dd, cm, placement, code):
    big = (POOL_BYTES // 8) * 3  # three of them do not fit, two do
    keep = cm.allocate_cache(desc(1, [PAGE], U8, placement))
    before = free_bytes(dd, placement)
    with raises_llm(code):
        cm.allocate_cache(desc(3, [big], U8, placement), [CacheKey(1, 1)])
    with raises_llm(code):
        cm.allocate_blocks_cache(desc(3, [1, big], U8, placement), BlocksCacheKey(1, 1))
    assert free_bytes(dd, placement) == before
    assert engine_of(dd).table.bound_keys() == {}
    fits = cm.allocate_cache(desc(2, [big], U8, placement), [CacheKey(1, 1)])
    written = fill(cm, fits, 3)
    assert all(torch.equal(x, y) for x, y in zip(snapshot(cm, fits), written))
    assert raw(cm, keep).numel() == PAGE


def test_oom_wins_over_bad_keys(dd, cm):
    cm.allocate_cache(desc(1, [2, 8]), [CacheKey(1, 1)])
    with raises_llm(DEVICE_OOM):
        cm.allocate_cache(desc(1, [2, POOL_BYTES]), [CacheKey(1, 1)])


def test_allocate_keys_bound_by_position(dd, cm):
    keys = [CacheKey(1, INVALID_ID, 1), CacheKey(1, 10), CacheKey(1, 0, 0, prefix_id=10)]
    cache = cm.allocate_cache(desc(1, [4, 8]), keys)
    assert engine_of(dd).table.bound_keys() == {
        ("req", 10, 0): (cache.cache_id, 1), ("prefix", 10, 0): (cache.cache_id, 2)}


@pytest.mark.parametrize("keys", [
    [CacheKey(1, 1), CacheKey(1, 2), CacheKey(1, 3)],                       # more keys than slots
    [CacheKey(1, 5), CacheKey(9, 5)],                                       # duplicate identity
    [CacheKey(1, INVALID_ID, 3), CacheKey(1, INVALID_ID, 3)],               # two equal paddings
    [CacheKey(1, 0, 0, 4), CacheKey(2, 1, 0, 4)],                           # duplicate prefix key
    [CacheKey(1, 100)],                                                     # bound elsewhere
    [CacheKey(1, 200, 0, 300)],                                             # prefix bound elsewhere
    [CacheKey(1, INVALID_ID, 7)],                                           # blocks key model 7
])
def test_allocate_bad_keys_change_nothing(dd, cm, keys):
    engine = engine_of(dd)
    cm.allocate_cache(desc(1, [2, 8]), [CacheKey(1, 100), CacheKey(1, 0, 0, 300)])
    cm.allocate_blocks_cache(desc(1, [2, 8]), BlocksCacheKey(1, 7))
    bound = engine.table.bound_keys()
    free = free_bytes(dd)
    with raises_llm(PARAM):
        cm.allocate_cache(desc(2, [2, 8]), keys)
    assert engine.table.bound_keys() == bound
    assert free_bytes(dd) == free
    assert len(engine.table.entries()) == 2
    # The pool is still whole: fill it exactly.
    cm.allocate_cache(desc(free // PAGE, [PAGE]))
    assert free_bytes(dd) == 0


def test_padding_keys_with_different_model_ids(dd, cm):
    keys = [CacheKey(1, INVALID_ID, 1), CacheKey(1, INVALID_ID, 2), CacheKey(1, 3)]
    cache = cm.allocate_cache(desc(1, [3, 8]), keys)
    assert engine_of(dd).table.bound_keys() == {("req", 3, 0): (cache.cache_id, 2)}


# ---- allocate_blocks_cache / deallocate_blocks_cache (§15.6, §15.8) ----------------------------

def test_allocate_blocks_cache(dd, cm):
    cache_desc = desc(2, [8, 32], DataType.DT_INT16)
    cache = cm.allocate_blocks_cache(cache_desc, BlocksCacheKey(1, 4))
    assert cache_desc._is_blocks is True
    assert cache.is_blocks_cache and cache.cache_id == 1
    assert engine_of(dd).table.bound_keys() == {("req", INVALID_ID, 4): (1, 0)}
    with raises_llm(PARAM):  # the blocks key is taken
        cm.allocate_blocks_cache(desc(2, [8, 32]), BlocksCacheKey(2, 4))
    assert free_bytes(dd) == POOL_BYTES - 2 * PAGE
    cm.deallocate_blocks_cache(cache)
    assert cache.tensor_addrs == []
    assert free_bytes(dd) == POOL_BYTES
    assert engine_of(dd).table.bound_keys() == {}
    again = cm.allocate_blocks_cache(desc(2, [8, 32]), BlocksCacheKey(1, 4))
    assert again.cache_id == 3


def test_allocate_blocks_cache_errors(cm):
    with pytest.raises(TypeError):
        cm.allocate_blocks_cache("desc")
    with pytest.raises(TypeError):
        cm.allocate_blocks_cache(desc(1, [4, 4]), CacheKey(1, 1))
    with pytest.raises(TypeError):
        cm.allocate_blocks_cache(desc(1, [4, 4]), BlocksCacheKey(1, -5))
    with raises_llm(PARAM):
        cm.allocate_blocks_cache(desc(0, [4, 4]))
    with raises_llm(PARAM):
        cm.allocate_blocks_cache(desc(1, [0, 4]))


def test_deallocate_blocks_cache_errors(dd, cm):
    contiguous = cm.allocate_cache(desc(1, [4, 4]))
    with raises_llm(PARAM):
        cm.deallocate_blocks_cache(contiguous)
    with pytest.raises(TypeError):
        cm.deallocate_blocks_cache("cache")
    with pytest.raises(AttributeError):
        cm.deallocate_blocks_cache(None)
    memory = torch.zeros(16, dtype=torch.uint8)
    cpu = Cache.create_cpu_cache(desc(1, [4, 4], U8, HOST), [memory.data_ptr()])
    cm.deallocate_blocks_cache(cpu)  # id -1: a no-op when a pool is configured
    registered = cm.register_blocks_cache(desc(1, [4, 4]), [memory.data_ptr()])
    cm.deallocate_blocks_cache(registered)  # registered: a no-op
    assert raw(cm, registered).data_ptr() == memory.data_ptr()
    blocks = cm.allocate_blocks_cache(desc(1, [4, 4]))
    cm.deallocate_blocks_cache(blocks)
    cm.deallocate_blocks_cache(blocks)  # double free: a no-op
    with raises_llm(NOT_EXIST):
        cm.get_cache_tensors(blocks)


# ---- deallocate_cache (§15.7) ------------------------------------------------------------------

def test_deallocate_cache(dd, cm):
    cache = cm.allocate_cache(desc(2, [2, PAGE]))
    assert free_bytes(dd) == POOL_BYTES - 4 * PAGE
    cm.deallocate_cache(cache)
    assert cache.tensor_addrs == []
    assert free_bytes(dd) == POOL_BYTES
    cm.deallocate_cache(cache)  # double free: a no-op
    with raises_llm(NOT_EXIST):
        cm.get_cache_tensors(cache)
    with raises_llm(NOT_EXIST):
        cm.copy_cache(cache, cache)


def test_deallocate_cache_errors(cm):
    blocks = cm.allocate_blocks_cache(desc(1, [4, 4]))
    with raises_llm(PARAM):
        cm.deallocate_cache(blocks)
    with pytest.raises(TypeError):
        cm.deallocate_cache("cache")
    with pytest.raises(TypeError):
        cm.deallocate_cache(KvCache(1, desc(1, [4]), [[1]], None))
    with pytest.raises(AttributeError):
        cm.deallocate_cache(None)


def test_deallocate_registered_cache_is_a_no_op(cm):
    memory = torch.zeros(16, dtype=torch.uint8)
    cache = cm.register_cache(desc(1, [16]), [memory.data_ptr()])
    cm.deallocate_cache(cache)
    assert cache.tensor_addrs == [memory.data_ptr()]
    raw(cm, cache).fill_(4)
    assert bool((memory == 4).all())


def test_pool_operations_without_any_pool(make_datadist):
    manager = make_datadist(mem_pool=None, host_pool=None).cache_manager
    memory = torch.zeros(2, 16, dtype=torch.uint8)
    cache = manager.register_cache(desc(1, [16]), [memory[0].data_ptr()])
    blocks = manager.register_blocks_cache(desc(1, [1, 16]), [memory[1].data_ptr()])
    with raises_llm(NOT_ENABLED):
        manager.deallocate_cache(cache)
    with raises_llm(NOT_ENABLED):
        manager.deallocate_blocks_cache(blocks)
    with raises_llm(NOT_ENABLED):
        manager.remove_cache_key(CacheKey(1, 1))
    cpu = Cache.create_cpu_cache(desc(1, [1, 16], U8, HOST), [memory[1].data_ptr()])
    with raises_llm(NOT_ENABLED):
        manager.deallocate_blocks_cache(cpu)
    with raises_llm(PARAM):
        manager.allocate_cache(desc(1, [16]))
    with raises_llm(PARAM):
        manager.allocate_blocks_cache(desc(1, [1, 16], U8, HOST))
    raw(manager, cache).fill_(1)  # registered caches still work
    assert bool((memory[0] == 1).all())


# ---- key lifetimes (§14.3) and remove_cache_key (§15.9) ----------------------------------------

def test_deallocate_with_outstanding_keys_defers_the_free(dd, cm):
    engine = engine_of(dd)
    cache = cm.allocate_cache(desc(2, [2, PAGE]), [CacheKey(1, 1), CacheKey(1, 0, 0, prefix_id=2)])
    written = fill(cm, cache, 5)
    entry = engine.table.get(cache.cache_id)
    used = POOL_BYTES - free_bytes(dd)
    assert used == 4 * PAGE
    cm.deallocate_cache(cache)
    assert cache.tensor_addrs == []  # the handle is invalid at once
    assert POOL_BYTES - free_bytes(dd) == used  # the memory stays for the keys
    assert all(torch.equal(r, w) for r, w in zip(entry.raw, written))
    with raises_llm(NOT_EXIST):
        cm.get_cache_tensors(cache)
    assert engine.table.lookup_by_id(cache.cache_id) is entry  # still reachable by peers
    cm.remove_cache_key(CacheKey(99, 1))  # the cluster id of the key does not matter
    assert POOL_BYTES - free_bytes(dd) == used
    cm.remove_cache_key(CacheKey(1, 1))  # already released: a no-op
    cm.remove_cache_key(CacheKey(1, 0, 0, prefix_id=2))
    assert free_bytes(dd) == POOL_BYTES
    assert engine.table.lookup_by_id(cache.cache_id) is None
    assert engine.table.bound_keys() == {}


def test_remove_keys_before_deallocate(dd, cm):
    cache = cm.allocate_cache(desc(1, [2, 64]), [CacheKey(1, 1), CacheKey(1, 2)])
    written = fill(cm, cache, 6)
    cm.remove_cache_key(CacheKey(1, 1))
    cm.remove_cache_key(CacheKey(1, 2))
    assert torch.equal(snapshot(cm, cache)[0], written[0])  # still alive through its id
    other = cm.allocate_cache(desc(1, [1, 64]), [CacheKey(1, 1)])  # the key is free again
    assert engine_of(dd).table.bound_keys() == {("req", 1, 0): (other.cache_id, 0)}
    cm.deallocate_cache(cache)  # no keys left: freed at once
    assert free_bytes(dd) == POOL_BYTES - PAGE
    cm.deallocate_cache(other)  # still keyed: deferred
    assert free_bytes(dd) == POOL_BYTES - PAGE
    cm.remove_cache_key(CacheKey(1, 1))
    assert free_bytes(dd) == POOL_BYTES


def test_remove_cache_key_arguments(cm):
    with pytest.raises(TypeError):
        cm.remove_cache_key(BlocksCacheKey(1, 0))
    with pytest.raises(TypeError):
        cm.remove_cache_key("key")
    cm.remove_cache_key(CacheKey(1, 123456))  # unknown: a no-op


def test_remove_cache_key_of_blocks_key_identity_is_a_no_op(dd, cm):
    cm.allocate_blocks_cache(desc(1, [2, 8]), BlocksCacheKey(1, 5))
    cm.remove_cache_key(CacheKey(1, INVALID_ID, 5))
    assert ("req", INVALID_ID, 5) in engine_of(dd).table.bound_keys()


def test_conformance_33_keyed_copy_then_remove_with_fresh_key(dd, cm):
    src = cm.allocate_cache(desc(1, [1, 256]), [CacheKey(2, 0, 0)])
    dst = cm.allocate_cache(desc(1, [1, 256]))
    written = fill(cm, src, 8)
    cm.copy_cache(dst, src)
    assert torch.equal(raw(cm, dst), written[0])
    cm.deallocate_cache(src)
    cm.deallocate_cache(dst)
    assert free_bytes(dd) == POOL_BYTES - PAGE  # src waits for its key
    cm.remove_cache_key(CacheKey(2, 0, 0))
    assert free_bytes(dd) == POOL_BYTES


# ---- copy_cache (§15.15) -----------------------------------------------------------------------

def test_copy_cache_whole_slot(cm):
    src = cm.allocate_cache(desc(2, [4, 16]))
    dst = cm.allocate_cache(desc(2, [2, 32]))
    src_data = fill(cm, src, 1)
    dst_before = fill(cm, dst, 50)
    cm.copy_cache(dst, src, dst_batch_index=1, src_batch_index=3)
    for t in range(2):
        expected = dst_before[t].clone()
        expected[32:48] = src_data[t][48:64]  # n = src stride (16 bytes)
        assert torch.equal(raw(cm, dst, t), expected)
        assert torch.equal(raw(cm, src, t), src_data[t])


def test_copy_cache_offset_and_size(cm):
    src = cm.allocate_cache(desc(2, [4, 16]))
    dst = cm.allocate_cache(desc(2, [4, 16]))
    src_data = fill(cm, src, 2)
    dst_before = fill(cm, dst, 60)
    cm.copy_cache(dst, src, 2, 1, offset=4, size=8)
    for t in range(2):
        expected = dst_before[t].clone()
        expected[36:44] = src_data[t][20:28]
        assert torch.equal(raw(cm, dst, t), expected)
    cm.copy_cache(dst, src, 0, 0, offset=15)  # size -1: the rest of the slot, 1 byte
    cm.copy_cache(dst, src, 3, 3, offset=0, size=16)
    for t in range(2):
        expected = dst_before[t].clone()
        expected[36:44] = src_data[t][20:28]
        expected[15] = src_data[t][15]
        expected[48:64] = src_data[t][48:64]
        assert torch.equal(raw(cm, dst, t), expected)


def test_copy_cache_bounds(cm):
    src = cm.allocate_cache(desc(1, [4, 16]))   # stride 16
    dst = cm.allocate_cache(desc(1, [2, 32]))   # stride 32
    small = cm.allocate_cache(desc(1, [4, 8]))  # stride 8
    fill(cm, src, 1)
    before = snapshot(cm, dst)
    with raises_llm(PARAM):
        cm.copy_cache(dst, src, src_batch_index=4)
    with raises_llm(PARAM):
        cm.copy_cache(dst, src, dst_batch_index=2)
    with raises_llm(PARAM):  # offset must be inside both slots
        cm.copy_cache(dst, src, offset=16)
    with raises_llm(PARAM):
        cm.copy_cache(src, dst, offset=16)
    with raises_llm(PARAM):  # more than the source slot holds after the offset
        cm.copy_cache(dst, src, offset=4, size=13)
    with raises_llm(PARAM):  # fits the source slot, not the destination slot
        cm.copy_cache(small, src, size=9)
    with raises_llm(PARAM):  # size -1 = the source slot: too big for the destination
        cm.copy_cache(small, src)
    with raises_llm(PARAM):
        cm.copy_cache(dst, src, size=0)
    with raises_llm(PARAM):
        cm.copy_cache(dst, src, size=-2)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(cm, dst), before))
    cm.copy_cache(dst, src, offset=4, size=12)  # exactly fits
    cm.copy_cache(small, src, size=8)
    cm.copy_cache(dst, small)  # 8 bytes into a 32-byte slot


def test_copy_cache_argument_types(cm):
    a = cm.allocate_cache(desc(1, [2, 8]))
    b = cm.allocate_cache(desc(1, [2, 8]))
    for kwargs, error in [
            ({"dst_batch_index": -1}, ValueError), ({"dst_batch_index": 2**32}, ValueError),
            ({"src_batch_index": "0"}, TypeError), ({"src_batch_index": 1.0}, TypeError),
            ({"offset": -1}, ValueError), ({"offset": 2**64}, ValueError), ({"offset": None}, TypeError),
            ({"size": 2**63}, ValueError), ({"size": 1.5}, TypeError),
            ({"req_id": -1}, ValueError), ({"req_id": 2**64}, ValueError), ({"req_id": "1"}, TypeError)]:
        with pytest.raises(error):
            cm.copy_cache(a, b, **kwargs)
    with pytest.raises(TypeError):
        cm.copy_cache("a", b)
    with pytest.raises(TypeError):
        cm.copy_cache(a, KvCache(1, desc(1, [2, 8]), [[1]], None))
    with pytest.raises(AttributeError):
        cm.copy_cache(None, b)
    cm.copy_cache(a, b, req_id=INVALID_ID)
    cm.copy_cache(a, b, req_id=0)


def test_copy_cache_param_errors(cm):
    a = cm.allocate_cache(desc(1, [2, 8]))
    two = cm.allocate_cache(desc(2, [2, 8]))
    blocks = cm.allocate_blocks_cache(desc(1, [2, 8]))
    with raises_llm(PARAM):
        cm.copy_cache(a, blocks)
    with raises_llm(PARAM):
        cm.copy_cache(blocks, a)
    with raises_llm(PARAM):  # blocks are checked before the size
        cm.copy_cache(blocks, a, size=0)
    with raises_llm(PARAM):
        cm.copy_cache(a, two)
    gone = cm.allocate_cache(desc(1, [2, 8]))
    cm.deallocate_cache(gone)
    with raises_llm(NOT_EXIST):
        cm.copy_cache(a, gone)
    with raises_llm(NOT_EXIST):
        cm.copy_cache(gone, a)
    memory = torch.zeros(16, dtype=torch.uint8)
    foreign = Cache(999, desc(1, [2, 8]), [memory.data_ptr()], cm, False, False)
    with raises_llm(NOT_EXIST):
        cm.copy_cache(a, foreign)
    assert bool((memory == 0).all())


@pytest.mark.parametrize("src_placement, dst_placement", [
    (DEVICE, DEVICE), (DEVICE, HOST), (HOST, DEVICE), (HOST, HOST)])
def test_copy_cache_every_placement(cm, src_placement, dst_placement):
    src = cm.allocate_cache(desc(2, [3, 40], DataType.DT_BF16, src_placement))
    dst = cm.allocate_cache(desc(2, [3, 40], DataType.DT_BF16, dst_placement))
    src_data = fill(cm, src, 4)
    dst_before = fill(cm, dst, 40)
    cm.copy_cache(dst, src, 2, 0)
    for t in range(2):
        expected = dst_before[t].clone()
        expected[160:240] = src_data[t][0:80]
        assert torch.equal(raw(cm, dst, t), expected)


def test_copy_cache_between_registered_and_allocated(cm):
    memory = torch.zeros(2, 64, dtype=torch.uint8)
    registered = cm.register_cache(desc(1, [2, 64], U8, HOST), [memory.data_ptr()])
    allocated = cm.allocate_cache(desc(1, [2, 64]))
    data = fill(cm, allocated, 3)
    cm.copy_cache(registered, allocated, 1, 0)
    assert torch.equal(memory[1], data[0][:64])
    assert bool((memory[0] == 0).all())
    memory[0].copy_(pattern(64, 77))
    cm.copy_cache(allocated, registered, 1, 0, offset=10, size=20)
    assert torch.equal(raw(cm, allocated)[74:94], pattern(64, 77)[10:30])
    assert torch.equal(raw(cm, allocated)[:74], data[0][:74])
    assert torch.equal(raw(cm, allocated)[94:], data[0][94:])


def test_copy_cache_inside_one_cache(cm):
    cache = cm.allocate_cache(desc(1, [4, 16]))
    data = fill(cm, cache, 9)[0]
    cm.copy_cache(cache, cache, 0, 3)
    cm.copy_cache(cache, cache, 2, 2)  # onto itself
    expected = data.clone()
    expected[0:16] = data[48:64]
    assert torch.equal(raw(cm, cache), expected)


# ---- copy_blocks (§15.16) ----------------------------------------------------------------------

def blocks_of(manager, cache, index, block_bytes):
    return raw(manager, cache, index).view(-1, block_bytes)


def test_copy_blocks_fan_out(cm):
    cache = cm.allocate_blocks_cache(desc(2, [6, 8], DataType.DT_INT32))  # 32-byte blocks
    data = [d.view(6, 32) for d in fill(cm, cache, 1)]
    cm.copy_blocks(cache, {1: [2, 3], 5: [0]})
    for t in range(2):
        expected = data[t].clone()
        expected[2] = data[t][1]
        expected[3] = data[t][1]
        expected[0] = data[t][5]
        assert torch.equal(blocks_of(cm, cache, t, 32), expected)


def test_copy_blocks_chained_is_sequential(cm):
    cache = cm.allocate_blocks_cache(desc(2, [5, 16]))
    data = [d.view(5, 16) for d in fill(cm, cache, 2)]
    cm.copy_blocks(cache, {1: [2], 2: [3]})
    for t in range(2):
        expected = data[t].clone()
        expected[2] = data[t][1]
        expected[3] = data[t][1]  # block 2 already holds block 1 when it is copied on
        assert torch.equal(blocks_of(cm, cache, t, 16), expected)
    data = [blocks_of(cm, cache, t, 16).clone() for t in range(2)]
    cm.copy_blocks(cache, {0: [4], 4: [0]})  # a swap attempt: both end as block 0
    for t in range(2):
        expected = data[t].clone()
        expected[4] = data[t][0]
        assert torch.equal(blocks_of(cm, cache, t, 16), expected)


def test_copy_blocks_empty_mappings(cm):
    cache = cm.allocate_blocks_cache(desc(1, [4, 16]))
    data = fill(cm, cache, 3)
    cm.copy_blocks(cache, {})
    cm.copy_blocks(cache, {0: [], 3: []})
    assert torch.equal(raw(cm, cache), data[0])


def test_conformance_34_blocks_copy_and_deallocate(dd, cm):
    cache = cm.allocate_blocks_cache(desc(1, [2, 128], DataType.DT_FLOAT16))
    data = fill(cm, cache, 4)[0].view(2, 256)
    cm.copy_blocks(cache, {0: [1]})
    assert torch.equal(blocks_of(cm, cache, 0, 256), torch.stack([data[0], data[0]]))
    cm.deallocate_blocks_cache(cache)
    assert free_bytes(dd) == POOL_BYTES


def test_copy_blocks_errors(cm):
    cache = cm.allocate_blocks_cache(desc(1, [4, 16]))
    data = fill(cm, cache, 5)
    contiguous = cm.allocate_cache(desc(1, [4, 16]))
    with raises_llm(PARAM):
        cm.copy_blocks(cache, {4: [0]})
    with raises_llm(PARAM):
        cm.copy_blocks(cache, {0: [1, 4]})
    with pytest.raises(TypeError):
        cm.copy_blocks(cache, {-1: [0]})
    with pytest.raises(TypeError):
        cm.copy_blocks(cache, {0: [-1]})
    with pytest.raises(TypeError):
        cm.copy_blocks(cache, [(0, [1])])
    with pytest.raises(TypeError):
        cm.copy_blocks(cache, {"0": [1]})
    with pytest.raises(TypeError):
        cm.copy_blocks(cache, {0: 1})
    with pytest.raises(TypeError):
        cm.copy_blocks(cache, {0: (1,)})
    with pytest.raises(TypeError):
        cm.copy_blocks(cache, {0: ["1"]})
    with pytest.raises(TypeError):
        cm.copy_blocks(cache, {0: None})
    with pytest.raises(TypeError):
        cm.copy_blocks("cache", {0: [1]})
    with raises_llm(PARAM):
        cm.copy_blocks(contiguous, {0: [1]})
    assert torch.equal(raw(cm, cache), data[0])
    cm.deallocate_blocks_cache(cache)
    with raises_llm(NOT_EXIST):
        cm.copy_blocks(cache, {0: [1]})


def test_copy_blocks_registered(cm):
    memory = pattern(4 * 16, 6).view(4, 16).clone()
    before = memory.clone()
    cache = cm.register_blocks_cache(desc(1, [4, 16], U8, HOST), [memory.data_ptr()])
    cm.copy_blocks(cache, {3: [0, 1]})
    assert torch.equal(memory, torch.stack([before[3], before[3], before[2], before[3]]))


# ---- swap_blocks (§15.17) ----------------------------------------------------------------------

SWAP_MAP = {3: 4, 0: 0, 1: 1, 2: 2, 5: 6, 6: 7, 7: 8, 9: 9}


def test_conformance_35_swap_with_cpu_cache(make_datadist):
    """Item 35's layout (10 tensors, 10 blocks), blocks of 16 Ki fp16 instead of 64 Ki."""
    num_tensors, num_blocks, block_elems = 10, 10, 16 * 1024
    block_bytes = block_elems * 2
    manager = make_datadist(mem_pool=num_tensors * num_blocks * block_bytes, host_pool=None).cache_manager
    device = manager.allocate_blocks_cache(
        desc(num_tensors, [num_blocks, block_elems], DataType.DT_FLOAT16, DEVICE))
    host_memory = torch.zeros(num_tensors, num_blocks, block_elems, dtype=torch.float16)
    host_desc = desc(num_tensors, [num_blocks, block_elems], DataType.DT_FLOAT16, HOST)
    host = Cache.create_cpu_cache(host_desc, [host_memory[t].data_ptr() for t in range(num_tensors)])
    assert host.cache_id == -1 and host.is_blocks_cache
    device_data = [d.view(num_blocks, block_bytes) for d in fill(manager, device, 11)]

    manager.swap_blocks(device, host, SWAP_MAP)  # swap out
    host_bytes = host_memory.view(torch.uint8).view(num_tensors, num_blocks, block_bytes)
    for t in range(num_tensors):
        expected = torch.zeros(num_blocks, block_bytes, dtype=torch.uint8)
        for s, d in SWAP_MAP.items():
            expected[d] = device_data[t][s]
        assert torch.equal(host_bytes[t], expected)

    host_bytes.copy_(torch.stack([pattern(num_blocks * block_bytes, 100 + t).view(num_blocks, block_bytes)
                                  for t in range(num_tensors)]))
    host_data = host_bytes.clone()
    manager.swap_blocks(host, device, SWAP_MAP)  # swap in
    for t in range(num_tensors):
        expected = device_data[t].clone()
        for s, d in SWAP_MAP.items():
            expected[d] = host_data[t][s]
        assert torch.equal(blocks_of(manager, device, t, block_bytes), expected)


def test_swap_between_allocated_caches(cm):
    device = cm.allocate_blocks_cache(desc(2, [4, 8], DataType.DT_FLOAT, DEVICE))
    host = cm.allocate_blocks_cache(desc(2, [6, 8], DataType.DT_FLOAT, HOST))
    device_data = [d.view(4, 32) for d in fill(cm, device, 1)]
    host_data = [d.view(6, 32) for d in fill(cm, host, 20)]
    cm.swap_blocks(host, device, {5: 0, 0: 3})
    cm.swap_blocks(device, host, {1: 1, 2: 2})  # consecutive pairs merge
    for t in range(2):
        expected_device = device_data[t].clone()
        expected_device[0] = host_data[t][5]
        expected_device[3] = host_data[t][0]
        assert torch.equal(blocks_of(cm, device, t, 32), expected_device)
        expected_host = host_data[t].clone()
        expected_host[1:3] = device_data[t][1:3]
        assert torch.equal(blocks_of(cm, host, t, 32), expected_host)


def test_swap_duplicate_targets_last_wins(cm):
    device = cm.allocate_blocks_cache(desc(1, [4, 16], U8, DEVICE))
    host = cm.allocate_blocks_cache(desc(1, [4, 16], U8, HOST))
    data = fill(cm, device, 2)[0].view(4, 16)
    fill(cm, host, 3)
    cm.swap_blocks(device, host, {0: 2, 1: 2})
    assert torch.equal(blocks_of(cm, host, 0, 16)[2], data[1])


def test_swap_registered_and_empty(cm):
    memory = pattern(64, 4).view(4, 16).clone()
    host = cm.register_blocks_cache(desc(1, [4, 16], U8, HOST), [memory.data_ptr()])
    device = cm.allocate_blocks_cache(desc(1, [2, 16], U8, DEVICE))
    before = fill(cm, device, 8)[0]
    cm.swap_blocks(host, device, {})
    assert torch.equal(raw(cm, device), before)
    cm.swap_blocks(host, device, {3: 1})
    assert torch.equal(blocks_of(cm, device, 0, 16)[1], memory[3])
    assert torch.equal(blocks_of(cm, device, 0, 16)[0], before[:16])


def test_swap_blocks_errors(cm):
    device = cm.allocate_blocks_cache(desc(2, [4, 16], U8, DEVICE))
    device2 = cm.allocate_blocks_cache(desc(2, [4, 16], U8, DEVICE))
    host = cm.allocate_blocks_cache(desc(2, [4, 16], U8, HOST))
    host_other_block = cm.allocate_blocks_cache(desc(2, [4, 8], U8, HOST))
    host_one_tensor = cm.allocate_blocks_cache(desc(1, [4, 16], U8, HOST))
    contiguous = cm.allocate_cache(desc(2, [4, 16], U8, HOST))
    before = [snapshot(cm, c) for c in (device, device2, host)]
    with raises_llm(PARAM):  # D -> D
        cm.swap_blocks(device, device2, {0: 0})
    with raises_llm(PARAM):  # H -> H
        cm.swap_blocks(host, host, {0: 1})
    with raises_llm(PARAM):
        cm.swap_blocks(device, host_other_block, {0: 0})
    with raises_llm(PARAM):
        cm.swap_blocks(device, host_one_tensor, {0: 0})
    with raises_llm(PARAM):
        cm.swap_blocks(device, host, {4: 0})
    with raises_llm(PARAM):
        cm.swap_blocks(device, host, {0: 4})
    with raises_llm(PARAM):
        cm.swap_blocks(device, host, {-1: 0})
    with raises_llm(PARAM):
        cm.swap_blocks(device, host, {0: -1})
    with raises_llm(PARAM):
        cm.swap_blocks(device, contiguous, {0: 0})
    with raises_llm(PARAM):  # the blocks check comes before the mapping type check
        cm.swap_blocks(contiguous, device, "not a dict")
    with pytest.raises(TypeError):
        cm.swap_blocks(device, host, [(0, 0)])
    with pytest.raises(TypeError):
        cm.swap_blocks(device, host, {"0": 0})
    with pytest.raises(TypeError):
        cm.swap_blocks(device, host, {0: "0"})
    with pytest.raises(TypeError):
        cm.swap_blocks("device", host, {0: 0})
    with pytest.raises(AttributeError):
        cm.swap_blocks(None, host, {0: 0})
    with pytest.raises(AttributeError):
        cm.swap_blocks(device, None, {0: 0})
    after = [snapshot(cm, c) for c in (device, device2, host)]
    assert all(torch.equal(a, b) for x, y in zip(before, after) for a, b in zip(x, y))
    cm.deallocate_blocks_cache(device)
    with raises_llm(NOT_EXIST):
        cm.swap_blocks(device, host, {0: 0})


def test_swap_with_bogus_cpu_cache(cm):
    device = cm.allocate_blocks_cache(desc(1, [4, 16], U8, DEVICE))
    data = fill(cm, device, 1)[0]
    bogus = Cache.create_cpu_cache(desc(1, [4, 16], U8, HOST), [0x1000])
    with raises_llm(PARAM):
        cm.swap_blocks(device, bogus, {0: 0})
    with raises_llm(PARAM):
        cm.swap_blocks(bogus, device, {0: 0})
    with raw_mapping(PAGE, prot=mmap.PROT_READ) as read_only:
        ro = Cache.create_cpu_cache(desc(1, [4, 16], U8, HOST), [read_only])
        with raises_llm(PARAM):
            cm.swap_blocks(device, ro, {0: 0})
    assert torch.equal(raw(cm, device), data)


def test_create_cpu_cache_checks():
    memory = torch.zeros(2, 16, dtype=torch.uint8)
    addrs = [memory[0].data_ptr(), memory[1].data_ptr()]
    with pytest.raises(TypeError):
        Cache.create_cpu_cache("desc", addrs)
    with pytest.raises(TypeError):
        Cache.create_cpu_cache(desc(2, [1, 16], U8, HOST), tuple(addrs))
    with pytest.raises(TypeError):
        Cache.create_cpu_cache(desc(2, [1, 16], U8, HOST), [str(a) for a in addrs])
    with raises_llm(PARAM):
        Cache.create_cpu_cache(desc(2, [1, 16], U8, DEVICE), addrs)
    with raises_llm(PARAM):
        Cache.create_cpu_cache(desc(3, [1, 16], U8, HOST), addrs)
    with pytest.raises(AttributeError):
        Cache.create_cpu_cache(None, addrs)
    with pytest.raises(TypeError):
        Cache.create_cpu_cache(desc(2, [1, 16], U8, HOST), None)
    cache = Cache.create_cpu_cache(desc(2, [1, 16], U8, HOST), addrs)
    assert cache.tensor_addrs == addrs and cache.cache_id == -1 and cache.is_blocks_cache


# ---- remap_registered_memory (§15.18, §27 #14) --------------------------------------------------

def test_remap_registered_memory(cm):
    good = MemInfo(Memtype.MEM_TYPE_DEVICE, 0x10000, 4096)
    cm.remap_registered_memory(good)
    cm.remap_registered_memory([good, good])
    for bad in ("some val", 123, (good,), None,
                MemInfo(Memtype.MEM_TYPE_HOST, 0x10000, 4096),
                MemInfo(Memtype.MEM_TYPE_DEVICE, 0, 4096),
                MemInfo(Memtype.MEM_TYPE_DEVICE, 0x10000, -1),
                MemInfo(Memtype.MEM_TYPE_DEVICE, 0x10000, 0),
                [good, "x"], [MemInfo(Memtype.MEM_TYPE_DEVICE, 0, 1)], []):
        with raises_llm(PARAM):
            cm.remap_registered_memory(bad)


# ---- get_cache_tensors (§15.19) ----------------------------------------------------------------

@pytest.mark.parametrize("data_type", list(DataType))
def test_get_cache_tensors_dtypes(cm, data_type):
    cache = cm.allocate_cache(desc(2, [3, 5], data_type))
    for index in range(2):
        views = cm.get_cache_tensors(cache, index)
        assert isinstance(views, list) and len(views) == 1
        view = views[0]
        assert view.data_ptr() == cache.tensor_addrs[index]
        assert view.device == torch.device("cpu")
        assert view.is_contiguous()
        if data_type == DataType.DT_STRING:
            assert view.dtype == torch.uint8 and view.shape == (3, 5, 16)
        else:
            assert view.dtype == to_torch_dtype(data_type) and view.shape == (3, 5)
        assert view.numel() * view.element_size() == cache.cache_desc.size


def test_get_cache_tensors_bf16_and_string_values(cm):
    bf16 = cm.allocate_cache(desc(1, [2, 4], DataType.DT_BF16))
    values = torch.tensor([[1.5, -2.0, 3.25, 1e30], [0.0, -0.0, 7.0, 65504.0]], dtype=torch.bfloat16)
    cm.get_cache_tensors(bf16)[0].copy_(values)
    assert torch.equal(raw(cm, bf16), values.view(-1).view(torch.uint8))
    assert cm.get_cache_tensors(bf16)[0].dtype == torch.bfloat16
    string = cm.allocate_cache(desc(1, [2, 3], DataType.DT_STRING))
    view = cm.get_cache_tensors(string)[0]
    view.copy_(pattern(96, 1).view(2, 3, 16))
    assert torch.equal(raw(cm, string), pattern(96, 1))


def test_get_cache_tensors_views_share_memory(cm):
    a = cm.allocate_cache(desc(2, [2, 8], DataType.DT_INT64))
    b = cm.allocate_cache(desc(2, [2, 8], DataType.DT_INT64))
    first = cm.get_cache_tensors(a, 1)[0]
    second = cm.get_cache_tensors(a, 1)[0]
    first.copy_(torch.arange(16, dtype=torch.int64).view(2, 8) - 8)
    assert torch.equal(second, first)
    cm.copy_cache(b, a, 0, 1)
    assert torch.equal(cm.get_cache_tensors(b, 1)[0][0], torch.arange(8, 16) - 8)
    tensors = a.tensors
    assert len(tensors) == 2 and tensors[1].data_ptr() == first.data_ptr()


def test_get_cache_tensors_errors(cm):
    cache = cm.allocate_cache(desc(2, [2, 8]))
    with pytest.raises(TypeError):
        cm.get_cache_tensors("cache")
    with pytest.raises(TypeError):
        cm.get_cache_tensors(None)
    with pytest.raises(TypeError):
        cm.get_cache_tensors(KvCache(1, desc(1, [4]), [[1]], None))
    with pytest.raises(TypeError):
        cm.get_cache_tensors(cache, "0")
    with pytest.raises(TypeError):
        cm.get_cache_tensors(cache, 1.0)
    with pytest.raises(ValueError):
        cm.get_cache_tensors(cache, 2)
    with pytest.raises(ValueError):
        cm.get_cache_tensors(cache, -1)
    memory = torch.zeros(16, dtype=torch.uint8)
    cpu = Cache.create_cpu_cache(desc(1, [2, 8], U8, HOST), [memory.data_ptr()])
    with raises_llm(NOT_EXIST):
        cm.get_cache_tensors(cpu)
    registered = cm.register_cache(desc(1, [16]), [memory.data_ptr()])
    cm.unregister_cache(registered.cache_id)
    with raises_llm(NOT_EXIST):
        cm.get_cache_tensors(registered)
    cm.deallocate_cache(cache)
    with raises_llm(NOT_EXIST):
        cm.get_cache_tensors(cache, 1)


def test_cache_repr(cm):
    cache = cm.allocate_blocks_cache(desc(3, [2, 8]))
    assert repr(cache) == "Cache(cache_id = 1, device_tensor_addrs = 3, is_blocks_cache = True)"
    assert str(cache) == repr(cache)
