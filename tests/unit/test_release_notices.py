"""Release notices of pulled request keys (control/releases.py): a keyed pull costs one round
trip, the key is released on the owner soon after, a second pull of it fails, and only the
peer that pulled a key can release it; a notice delivered twice or late changes nothing.

Clusters in one process, linked over real sockets on 127.0.0.1. A lost notice being sent
again is in test_fault_injection.py.
"""
import time

import pytest

from helpers import cluster_info, link_in_process, raises_llm
from llm_datadist_torch import CacheDesc, CacheKey, DataType, LLMStatusCode, Placement, faults
from llm_datadist_torch.control.messages import Pulled, Release, Resolve

SHAPE = [4, 64]


def _bound(owner):
    return set(owner._engine.table.bound_keys())


def _wait_unbound(owner, identity):
    deadline = time.monotonic() + 10
    while identity in _bound(owner):
        assert time.monotonic() < deadline, f"{identity} stays bound on the owner"
        time.sleep(0.01)


@pytest.fixture
def keyed(make_datadist):
    """An owner with a 4-slot cache, slot i bound to request i, every int32 = 9."""
    owner = make_datadist(listen_ip_info="127.0.0.1:0")
    keys = [CacheKey(owner.cluster_id, req_id=r) for r in range(SHAPE[0])]
    source = owner.cache_manager.allocate_cache(
        CacheDesc(1, SHAPE, DataType.DT_INT32, Placement.HOST), keys)
    source.tensors[0].fill_(9)
    return owner, keys, source


def _puller(make_datadist, owner):
    puller = make_datadist()
    link_in_process(puller, owner)
    local = puller.cache_manager.allocate_cache(CacheDesc(1, SHAPE, DataType.DT_INT32))
    return puller, local


def test_a_pulled_key_is_released_and_a_second_pull_of_it_fails(keyed, make_datadist):
    owner, keys, _ = keyed
    puller, local = _puller(make_datadist, owner)
    puller.cache_manager.pull_cache(keys[0], local, 0)
    # The next request carries the notice: the owner applies it before answering.
    with raises_llm(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST):
        puller.cache_manager.pull_cache(keys[0], local, 1)
    puller.cache_manager.pull_cache(keys[1], local, 1)
    assert bool((local.tensors[0][:2] == 9).all())
    _wait_unbound(owner, ("req", 1, 0))  # the last one goes on its own, within milliseconds
    assert not len(puller._links.get(owner.cluster_id).releases)


def test_only_the_peer_that_pulled_a_key_releases_it(keyed, make_datadist):
    owner, keys, source = keyed
    honest, local = _puller(make_datadist, owner)
    other, _ = _puller(make_datadist, owner)
    link = other._links.get(owner.cluster_id)
    forged = [Pulled(key=["req", 2, 0], cache_id=source.cache_id, tensors=[0])]
    link.rpc.call(Release(session=link.session, pulled=forged), 5.0)
    request = Resolve(session=link.session, key_kind="cache_key", req_id=3,
                      prefix_id=keys[3].prefix_id, model_id=0, cache_id=-1, batch_index=0,
                      direction="pull", op="c2c",
                      geometry=other._engine.table.entries()[0].geometry,
                      placement=int(Placement.DEVICE),
                      requester_slot=0, nbytes=256, src_blocks=[], dst_blocks=[],
                      src_tensors=[], dst_tensors=[],
                      released=[Pulled(key=["req", 1, 0], cache_id=source.cache_id,
                                       tensors=[0])])
    link.rpc.call(request, 5.0)  # a real answer about key 3; the notice about key 1 is not its
    assert {("req", 1, 0), ("req", 2, 0), ("req", 3, 0)} <= _bound(owner)
    honest.cache_manager.pull_cache(keys[2], local, 0)
    assert bool((local.tensors[0][0] == 9).all())
    _wait_unbound(owner, ("req", 2, 0))
    assert {("req", 1, 0), ("req", 3, 0)} <= _bound(owner)


def test_a_late_notice_does_not_release_the_key_bound_again(keyed, make_datadist):
    """A notice sent again after the key was released and bound to a new cache names the old
    cache: the new binding stays."""
    owner, keys, source = keyed
    puller, local = _puller(make_datadist, owner)
    puller.cache_manager.pull_cache(keys[0], local, 0)
    _wait_unbound(owner, ("req", 0, 0))
    again = owner.cache_manager.allocate_cache(
        CacheDesc(1, SHAPE, DataType.DT_INT32, Placement.HOST), [keys[0]])
    link = puller._links.get(owner.cluster_id)
    stale = [Pulled(key=["req", 0, 0], cache_id=source.cache_id, tensors=[0])]
    link.rpc.call(Release(session=link.session, pulled=stale), 5.0)
    assert ("req", 0, 0) in _bound(owner)
    again.tensors[0].fill_(4)
    puller.cache_manager.pull_cache(keys[0], local, 3)
    assert bool((local.tensors[0][3] == 4).all())


def test_unlink_delivers_the_notices_left(keyed, make_datadist):
    """The notice of a key pulled just before an unlink reaches the owner before the unlink
    returns, even when the engine's own send of it was lost."""
    owner, keys, _ = keyed
    puller, local = _puller(make_datadist, owner)
    faults.arm("rpc.drop", "Release", count=1)
    try:
        puller.cache_manager.pull_cache(keys[0], local, 0)
        port = int(owner._links.listening.rsplit(":", 1)[1])
        status, _ = puller.unlink_clusters([cluster_info(owner.cluster_id, port)], 5000)
    finally:
        faults.clear()
    assert status == LLMStatusCode.LLM_SUCCESS
    assert ("req", 0, 0) not in _bound(owner)
