"""Transfers through the owner's host staging area: the path device memory of another process
takes. Forced here on CPU memory (LLM_DATADIST_TORCH_STAGE_TRANSFERS=1 on the requester), so
the staging copies, chunking and key release run for real between two processes."""
import multiprocessing
import os
import time

import pytest
import torch

from helpers import cluster_info, raises_llm
from llm_datadist_torch import (BlocksCacheKey, CacheDesc, CacheKey, DataType, LLMConfig,
                                LLMDataDist, LLMRole, LLMStatusCode, Placement)
from llm_datadist_torch.control.host import free_port

pytestmark = pytest.mark.multiprocess

OWNER, REQUESTER = 7301, 7302
BLOCKS = [16, 4, 8, 64]  # 16 blocks of 4x8x64 fp32 = 8 KiB per block and tensor
SLOTS = [4, 2048]
BIG = [2, 1 << 18]  # 80 tensors with 1 MiB slots: 80 MiB per slot, more than the staging area
BIG_TENSORS = 80


def content(seed, shape):
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) + seed * 1000.0


def options(listen=None):
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    config.enable_remote_cache_accessible = False
    config.mem_pool_cfg = '{"memory_size": 33554432}'
    config.sync_kv_timeout = 10000
    if listen:
        config.listen_ip_info = listen
    return config.generate_options()


def owner_main(conn, port):
    datadist = LLMDataDist(LLMRole.PROMPT, OWNER)
    datadist.init(options(f"127.0.0.1:{port}"))
    manager = datadist.cache_manager
    blocks = manager.allocate_blocks_cache(CacheDesc(4, BLOCKS, DataType.DT_FLOAT, Placement.DEVICE),
                                           BlocksCacheKey(OWNER, 0))
    slots = manager.allocate_cache(CacheDesc(2, SLOTS, DataType.DT_FLOAT, Placement.DEVICE),
                                   [CacheKey(OWNER, 11), CacheKey(OWNER, 12)])
    for index, tensor in enumerate(blocks.tensors):
        tensor.copy_(content(index, BLOCKS))
    for index, tensor in enumerate(slots.tensors):
        tensor.copy_(content(10 + index, SLOTS))
    big = [content(100 + index, BIG) for index in range(BIG_TENSORS)]  # engine-owned tensors
    manager.register_cache(CacheDesc(BIG_TENSORS, BIG, DataType.DT_FLOAT, Placement.DEVICE),
                           [t.data_ptr() for t in big], [CacheKey(OWNER, 21)])
    conn.send("ready")
    while True:
        command = conn.recv()
        if command == "blocks":
            conn.send([t.clone() for t in blocks.tensors])
        elif command == "keys":
            conn.send(sorted(manager._engine.table.bound_keys()))
        else:
            break
    datadist.finalize()
    conn.send("bye")


def link_to_owner(datadist, port):
    assert datadist.link_clusters([cluster_info(OWNER, port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS


@pytest.fixture
def owner():
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    process = ctx.Process(target=owner_main, args=(child_conn, port), daemon=True)
    process.start()
    try:
        assert conn.poll(60) and conn.recv() == "ready"
        yield conn, port
        conn.send("exit")
        assert conn.poll(30) and conn.recv() == "bye"
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


@pytest.fixture
def staged_requester(owner, monkeypatch):
    """A requester linked to the owner, every transfer forced through the staging area."""
    monkeypatch.setenv("LLM_DATADIST_TORCH_STAGE_TRANSFERS", "1")
    datadist = LLMDataDist(LLMRole.DECODER, REQUESTER)
    datadist.init(options())
    try:
        link_to_owner(datadist, owner[1])
        yield datadist
    finally:
        datadist.finalize()


def test_pulls_and_pushes_go_through_the_staging_area(owner, staged_requester):
    conn, _ = owner
    manager = staged_requester.cache_manager
    local = manager.allocate_blocks_cache(CacheDesc(4, BLOCKS, DataType.DT_FLOAT, Placement.DEVICE))
    for tensor in local.tensors:
        tensor.fill_(-1)
    # Layer 1 only (tensors 2 and 3): blocks 3, 9 -> 0, 5.
    manager.pull_blocks(BlocksCacheKey(OWNER, 0), local, [3, 9], [0, 5],
                        src_layer_range=range(1, 2), dst_layer_range=range(1, 2))
    for index, tensor in enumerate(local.tensors):
        if index < 2:
            assert bool((tensor == -1).all())
        else:
            assert torch.equal(tensor[0], content(index, BLOCKS)[3])
            assert torch.equal(tensor[5], content(index, BLOCKS)[9])
            assert bool((tensor[[1, 2, 3, 4, 6]] == -1).all())
    assert any(".staging." in name for name in os.listdir("/dev/shm"))  # the owner's area

    # A request key through staging: released by the owner once the notice that follows the
    # pull arrives (it does not hold up the pull: control/releases.py).
    slots = manager.allocate_cache(CacheDesc(2, SLOTS, DataType.DT_FLOAT, Placement.DEVICE))
    manager.pull_cache(CacheKey(OWNER, 12), slots, 3)
    for index, tensor in enumerate(slots.tensors):
        assert torch.equal(tensor[3], content(10 + index, SLOTS)[1])
    deadline = time.monotonic() + 10
    while True:
        conn.send("keys")
        keys = conn.recv()
        if ("req", 12, 0) not in keys or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert ("req", 11, 0) in keys and ("req", 12, 0) not in keys
    with raises_llm(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST):
        manager.pull_cache(CacheKey(OWNER, 12), slots, 0)


def test_a_slot_larger_than_the_staging_area_is_pulled_in_chunks(staged_requester):
    """80 tensors of 1 MiB slots (80 MiB, the area holds 64): the segments are split to fit,
    chunk by chunk, byte-exact into the requester's own registered tensors."""
    manager = staged_requester.cache_manager
    mine = [torch.full([1, BIG[1]], -1.0) for _ in range(BIG_TENSORS)]
    local = manager.register_cache(
        CacheDesc(BIG_TENSORS, [1, BIG[1]], DataType.DT_FLOAT, Placement.DEVICE),
        [t.data_ptr() for t in mine])
    manager.pull_cache(CacheKey(OWNER, 21), local, 0)
    for index, tensor in enumerate(mine):
        assert torch.equal(tensor[0], content(100 + index, BIG)[0])


def test_push_through_the_staging_area(owner, monkeypatch):
    conn, port = owner
    monkeypatch.setenv("LLM_DATADIST_TORCH_STAGE_TRANSFERS", "1")
    datadist = LLMDataDist(LLMRole.DECODER, REQUESTER)
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    config.enable_remote_cache_accessible = True
    config.mem_pool_cfg = '{"memory_size": 33554432}'
    datadist.init(config.generate_options())
    try:
        link_to_owner(datadist, port)
        manager = datadist.cache_manager
        source = manager.allocate_blocks_cache(CacheDesc(4, BLOCKS, DataType.DT_FLOAT, Placement.DEVICE))
        for index, tensor in enumerate(source.tensors):
            tensor.copy_(content(50 + index, BLOCKS))
        manager.push_blocks(BlocksCacheKey(OWNER, 0), source, [1, 2, 15], [14, 0, 7])
        conn.send("blocks")
        remote = conn.recv()
        for index, tensor in enumerate(remote):
            expected = content(index, BLOCKS)
            expected[[14, 0, 7]] = content(50 + index, BLOCKS)[[1, 2, 15]]
            assert torch.equal(tensor, expected)
    finally:
        datadist.finalize()
