"""Prepared transfers (transport/prepared.py): the bytes they move call after call, and that they
go with the owner's cache they were built for.

Two clusters in one process (the `local` transport prepares), linked over real sockets on
127.0.0.1. The cross-process transports (shm, cma) prepare the same way: their bytes are
checked in tests/integration/test_prepared_pulls.py.
"""
import random
import time

import msgspec
import numpy as np
import pytest
import torch

from helpers import link_in_process, raises_llm
from llm_datadist_torch import BlocksCacheKey, CacheDesc, DataType, LLMStatusCode, Placement

TENSORS, BLOCKS, BLOCK = 6, 16, 64


def _desc(tensors=TENSORS):
    return CacheDesc(tensors, [BLOCKS, BLOCK], DataType.DT_UINT8, Placement.DEVICE)


def _source(owner, seed):
    """A registered blocks cache bound to model 0: random bytes (returned: the memory)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(0, 256, (BLOCKS, BLOCK), dtype=torch.uint8, generator=generator)
               for _ in range(TENSORS)]
    cache = owner.cache_manager.register_blocks_cache(
        _desc(), [t.data_ptr() for t in tensors], BlocksCacheKey(owner.cluster_id, 0))
    return cache, tensors


def _prepared_for(link, cache_id):
    with link.lock:
        return [key for key in link.prepared if key[0] == cache_id]


def test_prepared_pulls_move_exactly_the_planned_blocks_call_after_call(linked_pair):
    owner, puller = linked_pair
    cache, source = _source(owner, seed=1)
    key = BlocksCacheKey(owner.cluster_id, 0)
    local = puller.cache_manager.allocate_blocks_cache(_desc())
    rng = random.Random(2)
    for _ in range(30):
        count = rng.randint(1, BLOCKS)
        src = [rng.randrange(BLOCKS) for _ in range(count)]
        dst = rng.sample(range(BLOCKS), count)
        before = [t.clone() for t in local.tensors]
        puller.cache_manager.pull_blocks(key, local, src, dst)
        for index, tensor in enumerate(local.tensors):
            expected = before[index]
            expected[dst] = source[index][src]
            assert torch.equal(tensor, expected), f"tensor {index}, {src} -> {dst}"
    # Layer ranges pick other tensor pairs: a prepared transfer of their own, same bytes.
    part = puller.cache_manager.allocate_blocks_cache(_desc(2))
    puller.cache_manager.pull_blocks(key, part, [3, 4], [0, 1], src_layer_range=range(1, 2),
                                     dst_layer_range=range(0, 1))
    assert torch.equal(part.tensors[0][:2], source[2][3:5])
    assert torch.equal(part.tensors[1][:2], source[3][3:5])
    link = puller._links.get(owner.cluster_id)
    assert len(_prepared_for(link, cache.cache_id)) == 2  # built once per pair of caches


def test_prepared_pushes_write_exactly_the_planned_blocks(make_linked_pair):
    owner, pusher = make_linked_pair(enable_remote_cache_accessible=True)
    target = [torch.zeros(BLOCKS, BLOCK, dtype=torch.uint8) for _ in range(TENSORS)]
    owner.cache_manager.register_blocks_cache(_desc(), [t.data_ptr() for t in target],
                                              BlocksCacheKey(owner.cluster_id, 0))
    local = pusher.cache_manager.allocate_blocks_cache(_desc())
    for index, tensor in enumerate(local.tensors):
        tensor.copy_(torch.randint(0, 256, (BLOCKS, BLOCK), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(index)))
    rng = random.Random(3)
    expected = [t.clone() for t in target]
    for _ in range(20):
        count = rng.randint(1, 4)
        src, dst = rng.sample(range(BLOCKS), count), rng.sample(range(BLOCKS), count)
        pusher.cache_manager.push_blocks(BlocksCacheKey(owner.cluster_id, 0), local, src, dst)
        for index in range(TENSORS):
            expected[index][dst] = local.tensors[index][src]
        assert all(torch.equal(t, e) for t, e in zip(target, expected))


def test_prepared_transfers_go_with_the_cache_they_were_built_for(linked_pair):
    """The owner frees the cache: the requester drops what it prepared for it (told by the
    owner's notice); a new cache under the same key is read afresh, never through the old."""
    owner, puller = linked_pair
    key = BlocksCacheKey(owner.cluster_id, 0)
    first = owner.cache_manager.allocate_blocks_cache(_desc(), key)
    for tensor in first.tensors:
        tensor.fill_(1)
    local = puller.cache_manager.allocate_blocks_cache(_desc())
    puller.cache_manager.pull_blocks(key, local, [0, 1], [0, 1])
    link = puller._links.get(owner.cluster_id)
    assert _prepared_for(link, first.cache_id)

    owner.cache_manager.deallocate_blocks_cache(first)
    deadline = time.monotonic() + 10
    while _prepared_for(link, first.cache_id):
        assert time.monotonic() < deadline, "the prepared transfer outlived its cache"
        time.sleep(0.01)
    with raises_llm(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST):
        puller.cache_manager.pull_blocks(key, local, [0, 1], [0, 1])

    second = owner.cache_manager.allocate_blocks_cache(_desc(), key)
    for tensor in second.tensors:
        tensor.fill_(2)
    puller.cache_manager.pull_blocks(key, local, [0, 1], [2, 3])
    assert all(bool((t[2:4] == 2).all()) for t in local.tensors)
    assert all(bool((t[0:2] == 1).all()) for t in local.tensors)  # untouched since
    assert not _prepared_for(link, first.cache_id) and _prepared_for(link, second.cache_id)


def test_a_reinitialised_owner_is_never_read_through_a_prepared_transfer(linked_pair, make_datadist):
    owner, puller = linked_pair
    _, first = _source(owner, seed=4)
    key = BlocksCacheKey(owner.cluster_id, 0)
    local = puller.cache_manager.allocate_blocks_cache(_desc())
    puller.cache_manager.pull_blocks(key, local, [0], [0])
    link = puller._links.get(owner.cluster_id)
    assert link.prepared
    port = owner._links.listening.rsplit(":", 1)[1]
    cluster_id = owner.cluster_id
    owner.finalize()
    again = make_datadist(cluster_id=cluster_id, listen_ip_info=f"127.0.0.1:{port}")
    _, second = _source(again, seed=5)
    before = [t.clone() for t in local.tensors]
    with raises_llm(LLMStatusCode.LLM_NOT_YET_LINK):
        puller.cache_manager.pull_blocks(key, local, [1], [1])
    assert not link.prepared  # dropped with what the link knew of the old owner
    puller._links.drop(cluster_id)
    link_in_process(puller, again)
    puller.cache_manager.pull_blocks(key, local, [1], [1])
    for index, tensor in enumerate(local.tensors):
        assert torch.equal(tensor[0], before[index][0])
        assert torch.equal(tensor[1], second[index][1])
    del first


@pytest.mark.parametrize("as_", ["tensor", "int32 tensor", "ndarray", "uint16 ndarray"])
def test_block_lists_may_be_tensors_or_arrays(linked_pair, as_):
    owner, puller = linked_pair
    _, source = _source(owner, seed=6)
    key = BlocksCacheKey(owner.cluster_id, 0)
    local = puller.cache_manager.allocate_blocks_cache(_desc())
    src, dst = [5, 1, 7], [0, 3, 2]
    convert = {"tensor": torch.tensor, "int32 tensor": lambda v: torch.tensor(v, dtype=torch.int32),
               "ndarray": np.array, "uint16 ndarray": lambda v: np.array(v, dtype=np.uint16)}[as_]
    puller.cache_manager.pull_blocks(key, local, convert(src), convert(dst))
    for index, tensor in enumerate(local.tensors):
        assert torch.equal(tensor[dst], source[index][src])


@pytest.mark.parametrize("blocks", [torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]]),
                                    np.array([0.5]), np.array([[1, 2]]), np.int64(3),
                                    torch.tensor([1, -2])], ids=repr)
def test_block_tensors_and_arrays_of_the_wrong_kind_are_a_type_error(linked_pair, blocks):
    owner, puller = linked_pair
    _source(owner, seed=7)
    local = puller.cache_manager.allocate_blocks_cache(_desc())
    with pytest.raises(TypeError):
        puller.cache_manager.pull_blocks(BlocksCacheKey(owner.cluster_id, 0), local, blocks, [0])
    with pytest.raises(TypeError):
        puller.cache_manager.pull_blocks(BlocksCacheKey(owner.cluster_id, 0), local, [0], blocks)


def test_an_answer_with_a_misaligned_fence_word_is_refused(linked_pair):
    """A peer's answer naming a fence word that is not an aligned word: `LLM_PARAM_INVALID`,
    nothing moved (the word is read atomically)."""
    owner, puller = linked_pair
    _source(owner, seed=8)
    key = BlocksCacheKey(owner.cluster_id, 0)
    local = puller.cache_manager.allocate_blocks_cache(_desc())
    puller.cache_manager.pull_blocks(key, local, [0], [0])
    link = puller._links.get(owner.cluster_id)
    with link.lock:
        (kept_key, reply), = link.descriptors.items()
        fence = msgspec.structs.replace(reply.fence, offset=reply.fence.offset + 3)
        link.descriptors[kept_key] = msgspec.structs.replace(reply, fence=fence)
        link.prepared.clear()
    before = [t.clone() for t in local.tensors]
    with raises_llm(LLMStatusCode.LLM_PARAM_INVALID):
        puller.cache_manager.pull_blocks(key, local, [1], [1])
    assert all(torch.equal(t, b) for t, b in zip(local.tensors, before))
