"""Never a wrong byte: an answer a requester kept is fenced by the owner, memory is pinned while a
copy uses it, and an owner that re-initialised is never read through an old answer.

Two clusters in one process (the `local` transport reads the fence word directly), linked over
real sockets on 127.0.0.1. The cross-process paths (shm, cma) are in
tests/integration/test_fenced_reinit.py.
"""
import threading

import pytest
import torch

from helpers import link_in_process, raises_llm
from llm_datadist_torch import (BlocksCacheKey, CacheDesc, DataType, LLMException, LLMStatusCode,
                                Placement)

SHAPE = [8, 256]
BLOCKS = [0, 1, 2, 3]


def _desc():
    return CacheDesc(2, SHAPE, DataType.DT_INT32, Placement.DEVICE)


def _owner_cache(owner, fill):
    """A registered blocks cache bound to model 0, every int32 set to `fill`."""
    tensors = [torch.full(SHAPE, fill, dtype=torch.int32) for _ in range(2)]
    owner.cache_manager.register_blocks_cache(_desc(), [t.data_ptr() for t in tensors],
                                              BlocksCacheKey(owner.cluster_id, 0))
    return tensors


@pytest.fixture
def pair(make_datadist):
    owner = make_datadist(listen_ip_info="127.0.0.1:0")
    puller = make_datadist()
    link_in_process(puller, owner)
    return owner, puller


def test_kept_answer_of_a_reinitialised_owner_is_never_used(pair, make_datadist):
    """The owner force-unlinks, unregisters, finalizes and comes back on the same port with new
    data; the puller's next pull through its kept answer fails with LLM_NOT_YET_LINK and moves
    no old byte into a result it reports; after linking again it gets the new bytes."""
    owner, puller = pair
    first = _owner_cache(owner, 1)
    key = BlocksCacheKey(owner.cluster_id, 0)
    local = puller.cache_manager.allocate_blocks_cache(_desc())
    puller.cache_manager.pull_blocks(key, local, BLOCKS, BLOCKS)
    assert bool((local.tensors[0][:4] == 1).all())
    assert puller._links.get(owner.cluster_id).descriptors  # the answer is kept

    port = owner._links.listening.rsplit(":", 1)[1]
    cluster_id = owner.cluster_id
    owner.finalize()  # drops every link and unregisters every cache
    del first  # the registered memory goes back to torch's allocator
    again = make_datadist(cluster_id=cluster_id, listen_ip_info=f"127.0.0.1:{port}")
    second = _owner_cache(again, 2)

    with raises_llm(LLMStatusCode.LLM_NOT_YET_LINK):
        puller.cache_manager.pull_blocks(key, local, BLOCKS, BLOCKS)

    puller._links.drop(cluster_id)
    link_in_process(puller, again)
    puller.cache_manager.pull_blocks(key, local, BLOCKS, BLOCKS)
    assert torch.equal(local.tensors[0][:4], second[0][:4])


def test_kept_answer_of_a_deallocated_cache_fails_before_the_invalidation_arrives(pair):
    """The fence word drops the moment the owner frees the cache, before any notice: a pull
    through the kept answer in between fails with LLM_KV_CACHE_NOT_EXIST."""
    owner, puller = pair
    key = BlocksCacheKey(owner.cluster_id, 0)
    cache = owner.cache_manager.allocate_blocks_cache(_desc(), key)
    local = puller.cache_manager.allocate_blocks_cache(_desc())
    puller.cache_manager.pull_blocks(key, local, BLOCKS, BLOCKS)
    link = puller._links.get(owner.cluster_id)
    kept = dict(link.descriptors)
    owner.cache_manager.deallocate_blocks_cache(cache)
    with link.lock:
        link.descriptors.update(kept)  # as if the owner's notice had not arrived yet
    with raises_llm(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST):
        puller.cache_manager.pull_blocks(key, local, BLOCKS, BLOCKS)


def test_deallocating_a_destination_while_pulls_run_never_raises_anything_untyped(pair):
    """Pulls into a cache another thread deallocates: each pull succeeds or fails with
    LLM_KV_CACHE_NOT_EXIST (never IndexError or a crash), and no byte lands in freed memory."""
    owner, puller = pair
    _owner_cache(owner, 5)
    key = BlocksCacheKey(owner.cluster_id, 0)
    errors = []
    for _ in range(60):
        local = puller.cache_manager.allocate_blocks_cache(_desc())
        go = threading.Event()

        def pull():
            go.wait()
            for _ in range(5):
                try:
                    puller.cache_manager.pull_blocks(key, local, BLOCKS, BLOCKS)
                except LLMException as exc:
                    if exc.status_code != LLMStatusCode.LLM_KV_CACHE_NOT_EXIST:
                        errors.append(repr(exc))
                except Exception as exc:  # noqa: BLE001 - exactly what must not happen
                    errors.append(repr(exc))

        thread = threading.Thread(target=pull)
        thread.start()
        go.set()
        puller.cache_manager.deallocate_blocks_cache(local)
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert errors == []
