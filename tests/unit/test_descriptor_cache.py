"""A requester keeps the owner's answer for blocks keys and cache ids, and forgets it when told.

Two clusters in one process (local transport), linked over real sockets on 127.0.0.1.
"""
import time

import torch

from llm_datadist_torch import (BlocksCacheKey, CacheDesc, CacheKeyByIdAndIndex, DataType,
                                LLMStatusCode, Placement)
from helpers import raises_llm

SHAPE = [8, 256]


def _registered(manager, fill, key):
    tensors = [torch.full(SHAPE, fill, dtype=torch.int32) for _ in range(2)]
    cache = manager.register_blocks_cache(CacheDesc(2, SHAPE, DataType.DT_INT32, Placement.DEVICE),
                                          [t.data_ptr() for t in tensors], key)
    return cache, tensors


def _wait_forgotten(link, deadline_s=5.0):
    end = time.monotonic() + deadline_s
    while link.descriptors:
        assert time.monotonic() < end, "the owner's invalidation never arrived"
        time.sleep(0.005)


def test_blocks_answer_is_kept_and_forgotten_on_rebind(linked_pair):
    owner, puller = linked_pair
    key = BlocksCacheKey(owner.cluster_id, 0)
    _, first = _registered(owner.cache_manager, 1, key)
    local = puller.cache_manager.allocate_blocks_cache(CacheDesc(2, SHAPE, DataType.DT_INT32))
    puller.cache_manager.pull_blocks(key, local, [2], [0])
    link = puller._links.get(owner.cluster_id)
    assert len(link.descriptors) == 1
    first[0][3].fill_(7)
    puller.cache_manager.pull_blocks(key, local, [3], [1])  # served from the kept answer
    assert torch.equal(local.tensors[0][1], first[0][3])

    _, second = _registered(owner.cache_manager, 2, key)  # newest registration wins the key
    _wait_forgotten(link)
    puller.cache_manager.pull_blocks(key, local, [4], [2])
    assert bool((local.tensors[0][2] == 2).all()) and bool((local.tensors[1][2] == 2).all())


def test_deallocated_caches_are_not_found_after_invalidation(linked_pair):
    owner, puller = linked_pair
    desc = lambda: CacheDesc(2, SHAPE, DataType.DT_INT32, Placement.DEVICE)  # noqa: E731
    blocks = owner.cache_manager.allocate_blocks_cache(desc(), BlocksCacheKey(owner.cluster_id, 5))
    slots = owner.cache_manager.allocate_cache(desc())
    for tensor in blocks.tensors + slots.tensors:
        tensor.fill_(9)
    local_blocks = puller.cache_manager.allocate_blocks_cache(desc())
    local_slots = puller.cache_manager.allocate_cache(desc())
    by_id = CacheKeyByIdAndIndex(owner.cluster_id, slots.cache_id, 3)
    puller.cache_manager.pull_blocks(BlocksCacheKey(owner.cluster_id, 5), local_blocks, [0], [0])
    puller.cache_manager.pull_cache(by_id, local_slots, 1)
    assert bool((local_blocks.tensors[1][0] == 9).all()) and bool((local_slots.tensors[1][1] == 9).all())
    link = puller._links.get(owner.cluster_id)
    assert len(link.descriptors) == 2
    owner.cache_manager.deallocate_blocks_cache(blocks)
    owner.cache_manager.deallocate_cache(slots)
    _wait_forgotten(link)
    with raises_llm(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST):
        puller.cache_manager.pull_blocks(BlocksCacheKey(owner.cluster_id, 5), local_blocks, [0], [2])
    with raises_llm(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST):
        puller.cache_manager.pull_cache(by_id, local_slots, 2)


def test_pull_by_id_reuses_the_answer_except_for_keyed_slots(linked_pair):
    owner, puller = linked_pair
    desc = lambda: CacheDesc(2, SHAPE, DataType.DT_INT32, Placement.DEVICE)  # noqa: E731
    from llm_datadist_torch import CacheKey
    slots = owner.cache_manager.allocate_cache(desc(), [CacheKey(owner.cluster_id, 77)])  # slot 0
    for index, tensor in enumerate(slots.tensors):
        tensor.copy_(torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.int32).view(SHAPE) + index)
    local = puller.cache_manager.allocate_cache(desc())
    link = puller._links.get(owner.cluster_id)
    for slot in range(1, SHAPE[0]):
        puller.cache_manager.pull_cache(CacheKeyByIdAndIndex(owner.cluster_id, slots.cache_id, slot),
                                        local, slot)
    assert len(link.descriptors) == 1  # one answer served every slot
    with raises_llm(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST):
        puller.cache_manager.pull_cache(CacheKeyByIdAndIndex(owner.cluster_id, slots.cache_id,
                                                             SHAPE[0]), local, 0)
    # Slot 0 carries a key: the pull goes to the owner, which releases the key once the
    # notice that follows the pull arrives.
    puller.cache_manager.pull_cache(CacheKeyByIdAndIndex(owner.cluster_id, slots.cache_id, 0), local, 0)
    for mine, theirs in zip(local.tensors, slots.tensors):
        assert torch.equal(mine, theirs)
    deadline = time.monotonic() + 10
    while ("req", 77, 0) in owner.cache_manager._engine.table.bound_keys():
        assert time.monotonic() < deadline, "the pulled key stays bound"
        time.sleep(0.01)
