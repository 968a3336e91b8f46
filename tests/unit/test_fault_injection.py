"""The fault-injection switches (llm_datadist_torch.faults) do what they say, and the library
handles what they cause: a lost request times out and breaks the link until it is linked
again; a slow one is waited for within the deadline."""
import time

import pytest

from helpers import link_in_process, raises_llm
from llm_datadist_torch import (BlocksCacheKey, CacheDesc, CacheKey, DataType, LLMStatusCode,
                                Placement, faults)


@pytest.fixture(autouse=True)
def disarmed():
    faults.clear()
    yield
    faults.clear()


@pytest.fixture
def keyed_pair(make_datadist):
    owner = make_datadist(listen_ip_info="127.0.0.1:0", sync_kv_timeout=300)
    puller = make_datadist(sync_kv_timeout=300)
    link_in_process(puller, owner)
    keys = [CacheKey(owner.cluster_id, req_id=slot) for slot in range(4)]
    source = owner.cache_manager.allocate_cache(CacheDesc(1, [4, 64], DataType.DT_INT32,
                                                          Placement.HOST), keys)
    source.tensors[0].fill_(7)
    local = puller.cache_manager.allocate_cache(CacheDesc(1, [4, 64], DataType.DT_INT32))
    return owner, puller, keys, local


def test_a_dropped_request_times_out_and_the_pair_heals(keyed_pair):
    owner, puller, keys, local = keyed_pair
    faults.arm("rpc.drop", "Resolve", count=1)
    start = time.monotonic()
    with raises_llm(LLMStatusCode.LLM_TIMEOUT):
        puller.cache_manager.pull_cache(keys[0], local, 0)
    assert time.monotonic() - start < 2.0
    link = puller._links.get(owner.cluster_id)
    assert link.broken
    with raises_llm(LLMStatusCode.LLM_NOT_YET_LINK):  # broken until linked again
        puller.cache_manager.pull_cache(keys[0], local, 0)
    puller._links.drop(owner.cluster_id)
    link_in_process(puller, owner)
    puller.cache_manager.pull_cache(keys[0], local, 0)
    assert bool((local.tensors[0][0] == 7).all())


def test_a_delayed_request_is_waited_for_within_the_deadline(keyed_pair):
    owner, puller, keys, local = keyed_pair
    faults.arm("rpc.delay", "Resolve", seconds=0.1, count=1)
    puller.cache_manager.pull_cache(keys[1], local, 1)
    assert bool((local.tensors[0][1] == 7).all())
    assert not puller._links.get(owner.cluster_id).broken


def test_bad_fault_rules_are_refused():
    with pytest.raises(ValueError):
        faults.arm("rpc.lose", "Resolve")
    with pytest.raises(ValueError):
        faults.arm("copy.stall", "shm")  # needs seconds
    with pytest.raises(ValueError):
        faults.arm("copy.fail", "shm", count=0)


def test_a_failed_copy_is_a_typed_error_and_the_next_pull_works(make_datadist):
    owner = make_datadist(listen_ip_info="127.0.0.1:0")
    puller = make_datadist()
    link_in_process(puller, owner)
    key = BlocksCacheKey(owner.cluster_id, 0)
    source = owner.cache_manager.allocate_blocks_cache(
        CacheDesc(2, [4, 64], DataType.DT_INT32, Placement.HOST), key)
    for tensor in source.tensors:
        tensor.fill_(5)
    local = puller.cache_manager.allocate_blocks_cache(CacheDesc(2, [4, 64], DataType.DT_INT32))
    faults.arm("copy.fail", "local", count=1)
    with raises_llm(LLMStatusCode.LLM_FAILED):
        puller.cache_manager.pull_blocks(key, local, [0, 1], [0, 1])
    puller.cache_manager.pull_blocks(key, local, [0, 1], [0, 1])
    assert bool((local.tensors[1][:2] == 5).all())


def test_a_lost_release_notice_fails_nothing_and_is_sent_again(keyed_pair):
    """The bytes arrived: a lost Release does not fail the pull; the engine sends the notice
    again until the owner releases the key."""
    owner, puller, keys, local = keyed_pair
    faults.arm("rpc.drop", "Release", count=1)
    puller.cache_manager.pull_cache(keys[2], local, 2)
    assert bool((local.tensors[0][2] == 7).all())
    deadline = time.monotonic() + 10
    while ("req", 2, 0) in owner._engine.table.bound_keys():
        assert time.monotonic() < deadline, "the key was never released"
        time.sleep(0.02)
    assert not len(puller._links.get(owner.cluster_id).releases)
    with raises_llm(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST):
        puller.cache_manager.pull_cache(keys[2], local, 2)
