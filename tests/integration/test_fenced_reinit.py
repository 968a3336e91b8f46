"""Never a wrong byte across processes: what a decoder kept about the owner's caches is fenced.

The owner (a prompt process) force-unlinks its decoder, drops its cache, finalizes and
initializes again in the same process on the same port with new data; the decoder, which still
believes it is linked and keeps the owner's old answer, pulls again. The pull must fail with a
typed status (never hand back old or garbage bytes as a success), and after the decoder links
again it gets the new bytes. Pool memory goes through shm, registered memory through cma.
"""
import pytest

from agents import agent, key, new_cluster_id
from checks import B_SHAPE, Model, raises_code
from llm_datadist_torch import LLMStatusCode

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

BLOCKS = [0, 1, 2, 3]
STALE = (LLMStatusCode.LLM_NOT_YET_LINK, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST)


def _start(harness):
    p, d = harness.spawn(agent, name="prompt"), harness.spawn(agent, name="decoder")
    pid, did = new_cluster_id(), new_cluster_id()
    port = p.call("init", pid, "PROMPT", listen=True)["port"]
    d.call("init", did, "DECODER")
    return p, d, pid, did, port


def _owner_cache(p, memory: str, seed: int) -> None:
    if memory == "pool":
        p.call("allocate", "kv", 4, B_SHAPE, seed=seed, blocks=True, model_id=0)
    else:
        p.call("register", "kv", 4, B_SHAPE, seed=seed, model_id=0)


def _drop_owner_cache(p, memory: str) -> None:
    p.call("deallocate" if memory == "pool" else "unregister", "kv")


def _pull_and_check(d, pid: int, dst: Model, src_seed: int) -> None:
    d.call("pull_blocks", key("BlocksCacheKey", pid, 0), "kv", BLOCKS, BLOCKS)
    src = Model(src_seed, 4, B_SHAPE)
    for i in range(4):
        dst.t[i][:4] = src.t[i][:4]
    dst.check(d, "kv")


@pytest.mark.parametrize("memory", ["pool", "registered"])
def test_owner_reinitialised_on_the_same_port_is_never_read_through_an_old_answer(harness, memory):
    p, d, pid, did, port = _start(harness)
    _owner_cache(p, memory, seed=1)
    d.call("allocate", "kv", 4, B_SHAPE, seed=2, blocks=True)
    assert d.call("link", pid, port)["overall"] == 0
    dst = Model(2, 4, B_SHAPE)
    _pull_and_check(d, pid, dst, src_seed=1)
    assert d.call("transports_used", pid)[0] == ("shm" if memory == "pool" else "cma")

    p.call("unlink", did, force=True)
    _drop_owner_cache(p, memory)
    p.call("finalize")
    assert p.call("init", pid, "PROMPT", listen=port)["port"] == port
    _owner_cache(p, memory, seed=3)

    d.call("fill", "kv", 2)  # the decoder's cache back to its own bytes
    with pytest.raises(Exception) as info:
        d.call("pull_blocks", key("BlocksCacheKey", pid, 0), "kv", BLOCKS, BLOCKS)
    assert getattr(info.value, "status_code", None) in STALE, info.value

    assert d.call("unlink", pid, port, force=True)["overall"] == 0
    assert d.call("link", pid, port)["overall"] == 0
    _pull_and_check(d, pid, Model(2, 4, B_SHAPE), src_seed=3)
    d.call("unlink", pid, port)
    for child in (p, d):
        child.finish()


@pytest.mark.parametrize("memory", ["pool", "registered"])
def test_a_cache_dropped_after_the_answer_was_kept_is_never_read(harness, memory):
    """The owner drops the cache the decoder's kept answer names (the notice may come late):
    the next pull through the answer fails, or asks again and finds nothing; never old bytes."""
    p, d, pid, did, port = _start(harness)
    _owner_cache(p, memory, seed=5)
    d.call("allocate", "kv", 4, B_SHAPE, seed=6, blocks=True)
    assert d.call("link", pid, port)["overall"] == 0
    _pull_and_check(d, pid, Model(6, 4, B_SHAPE), src_seed=5)
    _drop_owner_cache(p, memory)
    d.call("fill", "kv", 6)
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST):
        d.call("pull_blocks", key("BlocksCacheKey", pid, 0), "kv", BLOCKS, BLOCKS)
    Model(6, 4, B_SHAPE).check(d, "kv")  # nothing was written into the destination
    d.call("unlink", pid, port)
    for child in (p, d):
        child.finish()
