"""Concurrent use of one LLMDataDist (spec §25, §8.3): data stays exact, nothing leaks."""
import threading
import time

import pytest
import torch

from llm_datadist_torch import (BlocksCacheKey, CacheKey, DataType, LLMException, LLMStatusCode,
                                Placement)
from helpers import desc, raw, pattern

pytestmark = pytest.mark.usefixtures("cpu_device")

DEVICE, HOST = Placement.DEVICE, Placement.HOST
U8 = DataType.DT_UINT8
THREADS = 8
ITERATIONS = 25
JOIN_TIMEOUT_S = 30


def run_threads(target, count=THREADS):
    errors = []
    start = threading.Barrier(count)

    def body(worker):
        try:
            start.wait(10)
            target(worker)
        except BaseException as exc:  # reported to the main thread
            errors.append((worker, repr(exc)))

    threads = [threading.Thread(target=body, args=(w,), daemon=True) for w in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "a worker hung"
    return errors


def one_round(cm, worker, iteration):
    """Allocate, fill, copy, copy blocks, swap, verify byte for byte, free everything."""
    seed = worker * 100_000 + iteration
    # Key identities leave the cluster id out, so req ids / model ids carry the worker.
    keys = [CacheKey(worker, seed * 2), CacheKey(worker, seed * 2 + 1)]
    src = cm.allocate_cache(desc(2, [2, 96], DataType.DT_FLOAT16, DEVICE), keys)
    dst = cm.allocate_cache(desc(2, [2, 96], DataType.DT_FLOAT16, HOST))
    written = []
    for t in range(2):
        data = pattern(384, seed + t)
        raw(cm, src, t).copy_(data)
        written.append(data)
    cm.copy_cache(dst, src, 1, 0)
    cm.copy_cache(dst, src, 0, 1, offset=10, size=50)
    for t in range(2):
        got = raw(cm, dst, t)
        assert torch.equal(got[192:384], written[t][0:192])
        assert torch.equal(got[10:60], written[t][202:252])

    device_blocks = cm.allocate_blocks_cache(desc(2, [4, 64], U8, DEVICE),
                                             BlocksCacheKey(worker, seed))
    host_blocks = cm.allocate_blocks_cache(desc(2, [4, 64], U8, HOST))
    blocks = []
    for t in range(2):
        data = pattern(256, seed + 10 + t)
        raw(cm, device_blocks, t).copy_(data)
        blocks.append(data.view(4, 64))
    cm.copy_blocks(device_blocks, {0: [1], 1: [2]})
    cm.swap_blocks(device_blocks, host_blocks, {2: 0, 3: 3})
    raw(cm, host_blocks, 0)[64:128].copy_(pattern(64, seed + 20))
    cm.swap_blocks(host_blocks, device_blocks, {1: 3})
    for t in range(2):
        host_view = raw(cm, host_blocks, t).view(4, 64)
        device_view = raw(cm, device_blocks, t).view(4, 64)
        assert torch.equal(host_view[0], blocks[t][0])  # block 2 held block 0 after copy_blocks
        assert torch.equal(host_view[3], blocks[t][3])
        assert torch.equal(device_view[:3], torch.stack([blocks[t][0]] * 3))
        if t == 0:
            assert torch.equal(device_view[3], pattern(64, seed + 20))

    cm.deallocate_cache(src)  # deferred by the two keys
    cm.remove_cache_key(keys[0])
    cm.remove_cache_key(CacheKey(worker + 100, keys[1].req_id))  # the cluster id does not matter
    cm.deallocate_cache(dst)
    cm.deallocate_blocks_cache(device_blocks)
    cm.deallocate_blocks_cache(host_blocks)


def test_eight_threads_on_one_instance(make_datadist):
    datadist = make_datadist(mem_pool=4 << 20, host_pool=4 << 20)
    cm = datadist.cache_manager
    engine = datadist._engine

    def worker(index):
        for iteration in range(ITERATIONS):
            one_round(cm, index, iteration)

    errors = run_threads(worker)
    assert errors == []
    for placement in (DEVICE, HOST):
        allocator = engine.pools[placement].allocator
        assert allocator.free_bytes == 4 << 20 and allocator.used_bytes == 0
    assert engine.table.entries() == []
    assert engine.table.bound_keys() == {}
    assert cm.allocate_cache(desc(1, [4 << 20])).cache_id == THREADS * ITERATIONS * 4 + 1


def test_threads_under_pool_pressure(make_datadist):
    """A small pool: some allocations fail with OOM, never leaving memory behind."""
    pool = 16 * 4096
    datadist = make_datadist(mem_pool=pool, host_pool=None)
    cm = datadist.cache_manager
    engine = datadist._engine
    outcomes = {"ok": 0, "oom": 0}
    lock = threading.Lock()

    def worker(index):
        for iteration in range(40):
            try:
                cache = cm.allocate_cache(desc(3, [4096]))  # 3 of 16 pages
            except LLMException as exc:
                assert exc.status_code == LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY
                with lock:
                    outcomes["oom"] += 1
                time.sleep(0.001)
                continue
            data = [pattern(4096, index * 100 + iteration + t) for t in range(3)]
            for t in range(3):
                raw(cm, cache, t).copy_(data[t])
            time.sleep(0.0005)
            for t in range(3):
                assert torch.equal(raw(cm, cache, t), data[t]), "another thread wrote into my cache"
            cm.deallocate_cache(cache)
            with lock:
                outcomes["ok"] += 1

    errors = run_threads(worker)
    assert errors == []
    assert outcomes["ok"] > 0 and outcomes["ok"] + outcomes["oom"] == THREADS * 40
    assert engine.pools[DEVICE].allocator.free_bytes == pool
    assert engine.table.entries() == []


def test_finalize_while_threads_run(make_datadist):
    datadist = make_datadist(mem_pool=4 << 20, host_pool=4 << 20)
    cm = datadist.cache_manager
    engine = datadist._engine
    stop_codes = {LLMStatusCode.LLM_FAILED, LLMStatusCode.LLM_PARAM_INVALID}
    rounds = [0] * THREADS
    stopped = [None] * THREADS

    def worker(index):
        iteration = 0
        while iteration < 10_000:
            try:
                one_round(cm, index, iteration)
            except LLMException as exc:
                assert exc.status_code in stop_codes, repr(exc)
                assert engine.closed  # errors only once finalize() began
                stopped[index] = exc.status_code
                return
            rounds[index] += 1
            iteration += 1

    def finalize_soon():
        time.sleep(0.15)
        datadist.finalize()

    finalizer = threading.Thread(target=finalize_soon, daemon=True)
    finalizer.start()
    errors = run_threads(worker)
    finalizer.join(JOIN_TIMEOUT_S)
    assert not finalizer.is_alive()
    assert errors == []
    assert all(code is not None for code in stopped), "a worker never noticed finalize"
    assert sum(rounds) > 0
    with pytest.raises(RuntimeError):
        datadist.cache_manager


def test_finalize_waits_for_a_running_call(make_datadist):
    datadist = make_datadist()
    engine = datadist._engine
    inside, observed = threading.Event(), []

    def long_call():
        with engine.operation():
            inside.set()
            time.sleep(0.2)
            observed.append(engine.closed)

    thread = threading.Thread(target=long_call, daemon=True)
    thread.start()
    assert inside.wait(5)
    start = time.monotonic()
    datadist.finalize()
    elapsed = time.monotonic() - start
    thread.join(5)
    assert observed == [False]  # the call ran to its end on a live engine
    assert elapsed >= 0.1
    assert engine.closed


def test_concurrent_views_and_registration(make_datadist):
    """Registering, viewing and unregistering disjoint memory from many threads."""
    datadist = make_datadist(mem_pool=None, host_pool=None)
    cm = datadist.cache_manager
    memory = torch.zeros(THREADS, 2, 512, dtype=torch.uint8)

    def worker(index):
        for iteration in range(30):
            region = memory[index]
            cache = cm.register_cache(desc(2, [512]), [region[0].data_ptr(), region[1].data_ptr()],
                                      [CacheKey(index, index * 1000 + iteration)])
            view = cm.get_cache_tensors(cache, 1)[0]
            view.copy_(pattern(512, index + iteration))
            assert torch.equal(region[1], pattern(512, index + iteration))
            cm.unregister_cache(cache.cache_id)

    errors = run_threads(worker)
    assert errors == []
    assert datadist._engine.registry.address_count() == 0
    assert datadist._engine.table.entries() == []
