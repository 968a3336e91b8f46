"""Pulls and pushes between a prompt and a decoder in separate processes (spec §15.10-15.13).

Every check is byte-exact over the whole destination cache: the moved region must hold the
source's bytes and everything else its own earlier bytes. Caches hold deterministic patterns
(`agents.tensor_pattern`) so the parent models what each byte must be (`Model`).
"""
import signal
import time

import pytest

from agents import key, new_cluster_id
from checks import (B_SHAPE, BLOCK, C_SHAPE, D_C_SHAPE, FAST_S, SLOT, Model, push_blocks_and_check,
                    raises_code, start_pair, stop_pair)
from harness import ChildError
from helpers import assert_no_shm_files
from llm_datadist_torch import LLMStatusCode

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]


def ckey(pair, req_id, model_id=0):
    return key("CacheKey", prompt_cluster_id=pair.pid, req_id=req_id, model_id=model_id)


# ---- pull_cache ---------------------------------------------------------------------------
def test_pull_cache_by_cache_key_releases_the_key(pair):
    p_keys = [ckey(pair, 100 + slot) for slot in range(4)]
    pair.p.call("allocate", "c1", 4, C_SHAPE, seed=11, keys=p_keys)
    pair.d.call("allocate", "c1", 4, D_C_SHAPE, seed=12)
    src, dst = Model(11, 4, C_SHAPE), Model(12, 4, D_C_SHAPE)

    pair.d.call("pull_cache", ckey(pair, 102), "c1", 1)           # slot 2 -> slot 1, all bytes
    for i in range(4):
        dst.t[i][1] = src.t[i][2]
    dst.check(pair.d, "c1")

    pair.d.call("pull_cache", ckey(pair, 103), "c1", 2, 100)      # slot 3 -> slot 2, 100 bytes
    for i in range(4):
        dst.t[i][2, :100] = src.t[i][3, :100]
    dst.check(pair.d, "c1")

    for req_id in (102, 103):  # consumed: gone at once, not after sync_kv_timeout
        with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):
            pair.d.call("pull_cache", ckey(pair, req_id), "c1", 0)
    dst.check(pair.d, "c1")
    src.check(pair.p, "c1")  # the owner's data is never written by a pull
    pair.p.call("remove_cache_key", ckey(pair, 102))  # removing a consumed key is a no-op


def test_pull_cache_by_id_and_index(pair):
    p_cache = pair.p.call("allocate", "c2", 4, C_SHAPE, seed=21, keys=[ckey(pair, 200)])
    pair.d.call("allocate", "c2", 4, D_C_SHAPE, seed=22)
    src, dst = Model(21, 4, C_SHAPE), Model(22, 4, D_C_SHAPE)

    # Slot 3 has no key: pulled twice, it stays.
    for dst_slot in (0, 2):
        pair.d.call("pull_cache", key("CacheKeyByIdAndIndex", pair.pid, p_cache, 3), "c2", dst_slot)
        for i in range(4):
            dst.t[i][dst_slot] = src.t[i][3]
    dst.check(pair.d, "c2")

    # Slot 0 is bound to req 200: pulling it by id and index consumes the key (spec §14.5).
    pair.d.call("pull_cache", key("CacheKeyByIdAndIndex", pair.pid, p_cache, 0), "c2", 1, SLOT // 2)
    for i in range(4):
        dst.t[i][1, :SLOT // 2] = src.t[i][0, :SLOT // 2]
    dst.check(pair.d, "c2")
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):
        pair.d.call("pull_cache", ckey(pair, 200), "c2", 0)
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):  # no batch index 4
        pair.d.call("pull_cache", key("CacheKeyByIdAndIndex", pair.pid, p_cache, 4), "c2", 0)
    dst.check(pair.d, "c2")


def test_pull_cache_layer_ranges(pair):
    # 3 layers of K, V on the prompt; 2 layers on the decoder.
    pair.p.call("allocate", "c3", 6, C_SHAPE, seed=31, keys=[ckey(pair, 300), ckey(pair, 301)])
    pair.d.call("allocate", "c3", 4, D_C_SHAPE, seed=32)
    src, dst = Model(31, 6, C_SHAPE), Model(32, 4, D_C_SHAPE)

    # Layer 2 -> layer 0 of slot 2: tensors 4, 5 -> 0, 1; the key is not yet fully pulled.
    pair.d.call("pull_cache", ckey(pair, 300), "c3", 2, src_layer_range=range(2, 3),
                dst_layer_range=range(0, 1))
    dst.t[0][2], dst.t[1][2] = src.t[4][0], src.t[5][0]
    dst.check(pair.d, "c3")
    # One tensor per layer: tensors 0..3 -> 0..3 of slot 1; now every tensor was pulled once.
    pair.d.call("pull_cache", ckey(pair, 300), "c3", 1, src_layer_range=range(0, 4),
                dst_layer_range=range(0, 4), tensor_num_per_layer=1)
    for i in range(4):
        dst.t[i][1] = src.t[i][0]
    dst.check(pair.d, "c3")
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):
        pair.d.call("pull_cache", ckey(pair, 300), "c3", 0)

    # Only a source range, as long as the local cache: layers 1, 2 -> every decoder tensor.
    pair.d.call("pull_cache", ckey(pair, 301), "c3", 0, src_layer_range=range(1, 3))
    for i in range(4):
        dst.t[i][0] = src.t[i + 2][1]
    dst.check(pair.d, "c3")
    # Mismatched ranges are refused locally, before anything moves.
    with raises_code(LLMStatusCode.LLM_PARAM_INVALID, FAST_S):
        pair.d.call("pull_cache", ckey(pair, 301), "c3", 0, src_layer_range=range(0, 2),
                    dst_layer_range=range(0, 1))
    dst.check(pair.d, "c3")


def test_pull_cache_from_registered_memory_keeps_its_keys(pair):
    """A registered contiguous cache (caller-owned tensors): keys are never consumed by pulls."""
    pair.p.call("register", "c4", 2, C_SHAPE, seed=41, blocks=False, keys=[ckey(pair, 400)])
    pair.d.call("allocate", "c4", 2, D_C_SHAPE, seed=42)
    src, dst = Model(41, 2, C_SHAPE), Model(42, 2, D_C_SHAPE)
    for dst_slot in (2, 0):
        pair.d.call("pull_cache", ckey(pair, 400), "c4", dst_slot)
        for i in range(2):
            dst.t[i][dst_slot] = src.t[i][0]
    dst.check(pair.d, "c4")
    assert "cma" in pair.d.call("transports_used", pair.pid)  # registered memory: not in shm


def test_pull_cache_between_different_strides(pair):
    """Slots of 256 bytes on the prompt, 512 on the decoder: `size` must fit both (spec §15.10)."""
    wide = [2, 16, 16]
    p_cache = pair.p.call("allocate", "c5", 2, C_SHAPE, seed=45, keys=[ckey(pair, 450), ckey(pair, 451)])
    pair.d.call("allocate", "c5", 2, wide, seed=46)
    src, dst = Model(45, 2, C_SHAPE), Model(46, 2, wide)
    with raises_code(LLMStatusCode.LLM_PARAM_INVALID, FAST_S):  # one local slot > a remote slot
        pair.d.call("pull_cache", ckey(pair, 450), "c5", 1)
    pair.d.call("pull_cache", ckey(pair, 450), "c5", 1, 200)  # the failed pull consumed nothing
    pair.d.call("pull_cache", key("CacheKeyByIdAndIndex", pair.pid, p_cache, 1), "c5", 0, SLOT)
    for i in range(2):
        dst.t[i][1, :200] = src.t[i][0, :200]
        dst.t[i][0, :SLOT] = src.t[i][1]
    dst.check(pair.d, "c5")


def test_deallocated_cache_stays_pullable_by_key(pair):
    """deallocate_cache right after filling (the v1 connector's pattern) defers the free until
    the keys are pulled (spec §14.3)."""
    pair.p.call("allocate", "c6", 2, C_SHAPE, seed=47, keys=[ckey(pair, 470), ckey(pair, 471)])
    pair.p.call("deallocate", "c6")
    pair.d.call("allocate", "c6", 2, D_C_SHAPE, seed=48)
    src, dst = Model(47, 2, C_SHAPE), Model(48, 2, D_C_SHAPE)
    pair.d.call("pull_cache", ckey(pair, 471), "c6", 0)
    pair.d.call("pull_cache", ckey(pair, 470), "c6", 2)
    for i in range(2):
        dst.t[i][0], dst.t[i][2] = src.t[i][1], src.t[i][0]
    dst.check(pair.d, "c6")
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):
        pair.d.call("pull_cache", ckey(pair, 470), "c6", 1)


# ---- pull_blocks --------------------------------------------------------------------------
@pytest.mark.parametrize("memory", ["registered", "allocated"])
def test_pull_blocks_b2b(pair, memory):
    name, model_id = f"b-{memory}", {"registered": 0, "allocated": 1}[memory]
    if memory == "registered":  # the vllm-ascend pattern: K, V per layer, the caller's tensors
        pair.p.call("register", name, 4, B_SHAPE, seed=51, model_id=model_id)
    else:
        pair.p.call("allocate", name, 4, B_SHAPE, seed=51, blocks=True, model_id=model_id)
    pair.d.call("register", name, 4, B_SHAPE, seed=52)
    src, dst = Model(51, 4, B_SHAPE), Model(52, 4, B_SHAPE)
    bkey = key("BlocksCacheKey", pair.pid, model_id)

    pair.d.call("pull_blocks", bkey, name, [5, 1, 2], [0, 6, 7])   # any order, not contiguous
    for i in range(4):
        for s, d in ((5, 0), (1, 6), (2, 7)):
            dst.t[i][d] = src.t[i][s]
    dst.check(pair.d, name)

    pair.d.call("pull_blocks", bkey, name, [3, 4], [3, 2], src_layer_range=range(1, 2),
                dst_layer_range=range(0, 1))                        # layer 1 -> layer 0
    for s, d in ((3, 3), (4, 2)):
        dst.t[0][d], dst.t[1][d] = src.t[2][s], src.t[3][s]
    dst.check(pair.d, name)

    pair.d.call("pull_blocks", bkey, name, [7], [4], src_layer_range=range(3, 4),
                dst_layer_range=range(1, 2), tensor_num_per_layer=1)  # tensor 3 -> tensor 1
    dst.t[1][4] = src.t[3][7]
    dst.check(pair.d, name)

    # Blocks keys are never consumed; bad block numbers fail without moving anything.
    pair.d.call("pull_blocks", bkey, name, [0], [1])
    for i in range(4):
        dst.t[i][1] = src.t[i][0]
    with raises_code(LLMStatusCode.LLM_PARAM_INVALID, FAST_S):
        pair.d.call("pull_blocks", bkey, name, [8], [5])
    with raises_code(LLMStatusCode.LLM_PARAM_INVALID, FAST_S):
        pair.d.call("pull_blocks", bkey, name, [0], [8])
    dst.check(pair.d, name)
    src.check(pair.p, name)
    used = pair.d.call("transports_used", pair.pid)
    assert ("cma" if memory == "registered" else "shm") in used, used


def test_pull_blocks_c2b(pair):
    """A contiguous slot of the prompt, cut into the decoder's blocks (spec §15.11 C2B)."""
    shape = [2, 16, 2, 8]  # slot = 512 bytes = 4 decoder blocks of 128 bytes
    pair.p.call("allocate", "c2b", 4, shape, seed=61, keys=[ckey(pair, 600), ckey(pair, 601)])
    pair.d.call("allocate", "c2b", 4, B_SHAPE, seed=62, blocks=True)
    src, dst = Model(61, 4, shape), Model(62, 4, B_SHAPE)
    pair.d.call("pull_blocks", ckey(pair, 601), "c2b", [], [7, 2, 5, 0])
    for i in range(4):
        for chunk, block in enumerate((7, 2, 5, 0)):
            dst.t[i][block] = src.t[i][1, chunk * BLOCK:(chunk + 1) * BLOCK]
    dst.check(pair.d, "c2b")
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):  # consumed like pull_cache
        pair.d.call("pull_blocks", ckey(pair, 601), "c2b", [], [1])
    dst.check(pair.d, "c2b")


def test_pull_blocks_c2b_partial_last_chunk(pair):
    """A 320-byte slot into 128-byte blocks: two whole chunks and the 64-byte rest."""
    shape = [1, 10, 16]
    pair.p.call("allocate", "c2b2", 2, shape, seed=63, keys=[ckey(pair, 630)])
    pair.d.call("allocate", "c2b2", 2, B_SHAPE, seed=64, blocks=True)
    src, dst = Model(63, 2, shape), Model(64, 2, B_SHAPE)
    with raises_code(LLMStatusCode.LLM_PARAM_INVALID, FAST_S):  # a 4th chunk does not exist
        pair.d.call("pull_blocks", ckey(pair, 630), "c2b2", [], [1, 3, 5, 7])
    pair.d.call("pull_blocks", ckey(pair, 630), "c2b2", [], [1, 3, 5])
    for i in range(2):
        dst.t[i][1] = src.t[i][0, :BLOCK]
        dst.t[i][3] = src.t[i][0, BLOCK:2 * BLOCK]
        dst.t[i][5, :64] = src.t[i][0, 2 * BLOCK:]
    dst.check(pair.d, "c2b2")


# ---- errors that must come back at once ----------------------------------------------------
def test_unknown_keys_fail_fast(pair):
    pair.d.call("allocate", "e1", 2, D_C_SHAPE, seed=71)
    pair.d.call("allocate", "e1b", 2, B_SHAPE, seed=72, blocks=True)
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):
        pair.d.call("pull_cache", ckey(pair, 987654), "e1", 0)
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):
        pair.d.call("pull_cache", key("CacheKeyByIdAndIndex", pair.pid, 99999, 0), "e1", 0)
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):
        pair.d.call("pull_blocks", key("BlocksCacheKey", pair.pid, 77), "e1b", [0], [0])
    Model(71, 2, D_C_SHAPE).check(pair.d, "e1")
    Model(72, 2, B_SHAPE).check(pair.d, "e1b")


def test_never_linked_cluster(pair):
    pair.d.call("allocate", "e2", 2, D_C_SHAPE, seed=73)
    stranger = new_cluster_id()
    with raises_code(LLMStatusCode.LLM_NOT_YET_LINK, FAST_S):
        pair.d.call("pull_cache", key("CacheKey", prompt_cluster_id=stranger, req_id=1), "e2", 0)
    with raises_code(LLMStatusCode.LLM_NOT_YET_LINK, FAST_S):
        pair.d.call("pull_cache", key("CacheKeyByIdAndIndex", stranger, 1, 0), "e2", 0)
    pair.d.call("allocate", "e2b", 2, B_SHAPE, seed=73, blocks=True)
    with raises_code(LLMStatusCode.LLM_NOT_YET_LINK, FAST_S):
        pair.d.call("pull_blocks", key("BlocksCacheKey", stranger, 0), "e2b", [0], [0])
    # The prompt never linked with the stranger either, and its links are bidirectional:
    pair.p.call("allocate", "e2", 2, D_C_SHAPE, seed=74)
    with raises_code(LLMStatusCode.LLM_NOT_YET_LINK, FAST_S):
        pair.p.call("pull_cache", key("CacheKey", prompt_cluster_id=stranger, req_id=1), "e2", 0)


def test_link_is_bidirectional(pair):
    """The prompt (server) pulls from the decoder (client) over the decoder's link."""
    pair.d.call("register", "bidir", 4, B_SHAPE, seed=75, model_id=5)
    pair.p.call("allocate", "bidir", 4, B_SHAPE, seed=76, blocks=True)
    src, dst = Model(75, 4, B_SHAPE), Model(76, 4, B_SHAPE)
    pair.p.call("pull_blocks", key("BlocksCacheKey", pair.did, 5), "bidir", [1, 2], [6, 0])
    for i in range(4):
        dst.t[i][6], dst.t[i][0] = src.t[i][1], src.t[i][2]
    dst.check(pair.p, "bidir")


# ---- remote-cache-accessible mode: push_cache / push_blocks ------------------------------------
def test_push_blocks(ra_pair):
    """The prompt writes into the decoder's registered blocks (sglang's pattern), over the link
    the decoder made."""
    push_blocks_and_check(ra_pair, dst_seed=81, src_seed=82, model_id=0)


def test_push_cache(ra_pair):
    d_cache = ra_pair.d.call("allocate", "pc", 4, C_SHAPE, seed=83)
    ra_pair.p.call("allocate", "pc", 4, D_C_SHAPE, seed=84)
    dst, src = Model(83, 4, C_SHAPE), Model(84, 4, D_C_SHAPE)
    ra_pair.p.call("push_cache", key("CacheKeyByIdAndIndex", ra_pair.did, d_cache, 3), "pc", 1)
    for i in range(4):
        dst.t[i][3] = src.t[i][1]
    dst.check(ra_pair.d, "pc")
    ra_pair.p.call("push_cache", key("CacheKeyByIdAndIndex", ra_pair.did, d_cache, 0), "pc", 2,
                   src_layer_range=range(1, 2), dst_layer_range=range(1, 2))
    dst.t[2][0], dst.t[3][0] = src.t[2][2], src.t[3][2]
    dst.check(ra_pair.d, "pc")
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):
        ra_pair.p.call("push_cache", key("CacheKeyByIdAndIndex", ra_pair.did, 99999, 0), "pc", 0)
    dst.check(ra_pair.d, "pc")


def test_remote_accessible_pull_cache(ra_pair):
    """In this mode pull_cache takes CacheKeyByIdAndIndex only; keys are not consumed."""
    p_cache = ra_pair.p.call("allocate", "rap", 2, C_SHAPE, seed=85,
                             keys=[key("CacheKey", prompt_cluster_id=ra_pair.pid, req_id=850)])
    ra_pair.d.call("allocate", "rap", 2, D_C_SHAPE, seed=86)
    src, dst = Model(85, 2, C_SHAPE), Model(86, 2, D_C_SHAPE)
    for dst_slot in (1, 2):
        ra_pair.d.call("pull_cache", key("CacheKeyByIdAndIndex", ra_pair.pid, p_cache, 0), "rap", dst_slot)
        for i in range(2):
            dst.t[i][dst_slot] = src.t[i][0]
    dst.check(ra_pair.d, "rap")
    with pytest.raises(ChildError) as info:
        ra_pair.d.call("pull_cache", key("CacheKey", prompt_cluster_id=ra_pair.pid, req_id=850), "rap", 0)
    assert info.value.exc_type == "TypeError"


def test_push_needs_remote_accessible_mode(pair):
    pair.p.call("allocate", "nra", 2, B_SHAPE, seed=87, blocks=True)
    with raises_code(LLMStatusCode.LLM_PARAM_INVALID, FAST_S):
        pair.p.call("push_blocks", key("BlocksCacheKey", pair.did, 0), "nra", [0], [0])


# ---- transports: chosen per memory region, or forced ----------------------------------------
@pytest.mark.parametrize("backend,registered_ok,allocated_ok", [
    ("shm", False, True),    # shm serves only pool memory in /dev/shm files
    ("cma", True, True),     # cma serves any CPU memory of a same-host peer
    ("local", False, False),  # local is for one process only
])
def test_forced_transport(harness, backend, registered_ok, allocated_ok):
    pair = start_pair(harness, decoder_kwargs={"listen": True, "transfer_backend": backend})
    pair.p.call("register", "reg", 2, B_SHAPE, seed=91, model_id=0)
    pair.p.call("allocate", "pool", 2, B_SHAPE, seed=92, blocks=True, model_id=1)
    for name, model_id, seed, ok in (("reg", 0, 91, registered_ok), ("pool", 1, 92, allocated_ok)):
        pair.d.call("allocate", name, 2, B_SHAPE, seed=93, blocks=True)
        dst = Model(93, 2, B_SHAPE)
        if ok:
            pair.d.call("pull_blocks", key("BlocksCacheKey", pair.pid, model_id), name, [2, 3], [3, 2])
            src = Model(seed, 2, B_SHAPE)
            for i in range(2):
                dst.t[i][3], dst.t[i][2] = src.t[i][2], src.t[i][3]
        else:
            with raises_code(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, FAST_S):
                pair.d.call("pull_blocks", key("BlocksCacheKey", pair.pid, model_id), name, [2], [3])
        dst.check(pair.d, name)
    assert pair.d.call("transports_used", pair.pid) == ([backend] if backend != "local" else [])
    stop_pair(pair)


# ---- a dead or silent peer -----------------------------------------------------------------
@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_dead_or_silent_peer_times_out(harness, fault):
    timeout_ms = 1000
    pair = start_pair(harness, decoder_kwargs={"sync_kv_timeout": timeout_ms})
    pair.p.call("allocate", "kv", 2, B_SHAPE, seed=95, blocks=True, model_id=0)
    pair.p.call("allocate", "other", 2, B_SHAPE, seed=97, blocks=True, model_id=1)
    pair.d.call("allocate", "kv", 2, B_SHAPE, seed=96, blocks=True)
    bkey = key("BlocksCacheKey", pair.pid, 0)
    pair.d.call("pull_blocks", bkey, "kv", [0], [0])  # the link works (and the file is mapped)
    if fault == "sigkill":
        pair.p.kill()
    else:
        pair.p.signal(signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(ChildError) as info:
        # A key not pulled before needs the owner to answer: dead or silent, it cannot.
        pair.d.call("pull_blocks", key("BlocksCacheKey", pair.pid, 1), "kv", [1], [1],
                    timeout=timeout_ms / 1000 + 5)
    elapsed = time.monotonic() - start
    assert info.value.exc_type == "LLMException", info.value
    assert elapsed < timeout_ms / 1000 + 1.0, f"failed after {elapsed:.2f} s"
    # Block 1 was not written; block 0 holds the first pull.
    dst, src = Model(96, 2, B_SHAPE), Model(95, 2, B_SHAPE)
    for i in range(2):
        dst.t[i][0] = src.t[i][0]
    dst.check(pair.d, "kv")
    # The broken link answers at once from now on, until it is unlinked.
    with raises_code(LLMStatusCode.LLM_NOT_YET_LINK, FAST_S):
        pair.d.call("pull_blocks", bkey, "kv", [1], [1])
    assert pair.d.call("unlink", pair.pid, force=True)["overall"] == 0
    with raises_code(LLMStatusCode.LLM_NOT_YET_LINK, FAST_S):
        pair.d.call("pull_blocks", bkey, "kv", [1], [1])
    if fault == "sigstop":  # let it go on: it must still be able to leave cleanly
        pair.p.signal(signal.SIGCONT)
        pair.p.finish()
        assert_no_shm_files(pair.p.pid)
    pair.d.finish()
    assert_no_shm_files(pair.d.pid)


def test_kept_answer_reads_one_sided_and_notices_a_dead_owner(harness):
    """A blocks key pulled before needs no round trip: a stopped owner's memory still reads
    (one-sided, like RDMA), and a killed owner fails the next pull at once."""
    pair = start_pair(harness, decoder_kwargs={"sync_kv_timeout": 1000})
    pair.p.call("allocate", "kv", 2, B_SHAPE, seed=98, blocks=True, model_id=0)
    pair.d.call("allocate", "kv", 2, B_SHAPE, seed=99, blocks=True)
    bkey = key("BlocksCacheKey", pair.pid, 0)
    pair.d.call("pull_blocks", bkey, "kv", [0], [0])
    pair.p.signal(signal.SIGSTOP)
    pair.d.call("pull_blocks", bkey, "kv", [1], [1])
    dst, src = Model(99, 2, B_SHAPE), Model(98, 2, B_SHAPE)
    for i in range(2):
        dst.t[i][0], dst.t[i][1] = src.t[i][0], src.t[i][1]
    dst.check(pair.d, "kv")
    pair.p.signal(signal.SIGCONT)
    pair.p.kill()
    with raises_code(LLMStatusCode.LLM_LINK_FAILED, FAST_S):
        pair.d.call("pull_blocks", bkey, "kv", [2], [2])
    with raises_code(LLMStatusCode.LLM_NOT_YET_LINK, FAST_S):
        pair.d.call("pull_blocks", bkey, "kv", [2], [2])
    pair.d.finish()
    assert_no_shm_files(pair.d.pid)
