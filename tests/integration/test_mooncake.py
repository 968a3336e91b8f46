"""The `mooncake` transport between two processes: on loopback, and between two "hosts" (two
network namespaces joined by a veth pair, see netns.py), with `transfer_backend="mooncake"`
on both sides (which needs `listen_ip_info` on both, spec §8.2).

Byte-exact checks as in test_pull_push.py; plus a cable pull in the middle of a large pull:
the pull fails within its timeout, and after the cable is back the decoder unlinks (force),
links again and pulls.
"""
import contextlib
import os
import time
import types

import pytest

from agents import key, new_cluster_id
from checks import (B_SHAPE, C_SHAPE, D_C_SHAPE, SYNC_TIMEOUT_MS, Model, push_blocks_and_check,
                    raises_code)
from harness import Harness
from helpers import mooncake_missing
from llm_datadist_torch import LLMStatusCode
from netns import VethPair, netns_agent

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120),
              pytest.mark.skipif(mooncake_missing() is not None, reason=mooncake_missing() or "")]

FAST_S = 2.0                  # over mooncake (checks.FAST_S: 1 s)
L_SHAPE = [64, 16, 1024]      # 64 blocks of 32 KiB per tensor: 8 MiB over 4 tensors
BIG_BLOCK = [512, 1024]       # 1 MiB blocks (fp16)


def start_pair(h, where, sync_timeout_ms=SYNC_TIMEOUT_MS, pool=32 << 20):
    """Prompt at where[0], decoder at where[1] ((namespace or None, ip)), both listening and
    forcing mooncake; the decoder links."""
    pid, did = new_cluster_id(), new_cluster_id()
    p = h.spawn(netns_agent, *where[0], name="prompt")
    d = h.spawn(netns_agent, *where[1], name="decoder")
    common = dict(listen=True, transfer_backend="mooncake", sync_kv_timeout=sync_timeout_ms,
                  mem_pool=pool)
    p.begin("init", pid, "PROMPT", **common)
    d.begin("init", did, "DECODER", **common)
    port = p.end(60)["port"]
    dport = d.end(60)["port"]
    pair = types.SimpleNamespace(p=p, d=d, pid=pid, did=did, port=port, dport=dport,
                                 pip=where[0][1], dip=where[1][1])
    result = d.call("link_to", pid, pair.pip, port)
    assert result == {"overall": 0, "per": [0]}, result
    return pair


def stop_pair(pair):
    pair.d.call("unlink_from", pair.pid, pair.pip, pair.port)
    for child in (pair.p, pair.d):
        child.finish(30)


@contextlib.contextmanager
def topology(name):
    """[(namespace, ip)] for the prompt and the decoder."""
    if name == "loopback":
        yield [(None, "127.0.0.1"), (None, "127.0.0.1")]
        return
    with VethPair() as net:
        yield [(net.ns[0], net.ip[0]), (net.ns[1], net.ip[1])]


@pytest.fixture(scope="module", params=["loopback", "two_hosts"])
def pair(request):
    with topology(request.param) as where, Harness() as h:
        pair = start_pair(h, where)
        yield pair
        stop_pair(pair)


def by_id(owner_id, cache_id, slot):
    return key("CacheKeyByIdAndIndex", owner_id, cache_id, slot)


def test_transfer_cache_async(pair):
    """Layer by layer into decoder blocks over mooncake (C2B: the last block half full)."""
    pair.p.call("allocate", "lw", 4, [1, 10, 16], seed=61)
    pair.d.call("allocate", "lw_blocks", 4, B_SHAPE, seed=63, blocks=True, model_id=5)
    config = ("key", key("BlocksCacheKey", pair.did, 5), (0, 2), (0, 2), 0)
    out = pair.p.call("transfer_layers", "lw", [config], seed=62, dst_block_indices=[6, 1, 4],
                      dst_block_memory_size=128)
    assert (out["final"], out["results"], out["asked"]) == (0, [0], [0, 1]), out
    src, dst = Model(62, 4, [1, 10, 16]), Model(63, 4, B_SHAPE)
    for k in range(4):
        flat = src.t[k].reshape(-1)
        dst.t[k][6], dst.t[k][1] = flat[0:128], flat[128:256]
        dst.t[k][4][:64] = flat[256:320]
    dst.check(pair.d, "lw_blocks")


def test_handshake_exchanges_endpoints(pair):
    p_end, d_end = pair.p.call("mooncake_endpoint"), pair.d.call("mooncake_endpoint")
    assert p_end.startswith(pair.pip + ":") and d_end.startswith(pair.dip + ":")
    assert pair.d.call("peer_mooncake_endpoint", pair.pid) == p_end
    assert pair.p.call("peer_mooncake_endpoint", pair.did) == d_end


def test_pull_cache(pair):
    p_cache = pair.p.call("allocate", "c", 4, C_SHAPE, seed=11)
    pair.d.call("allocate", "c", 4, D_C_SHAPE, seed=12)
    src, dst = Model(11, 4, C_SHAPE), Model(12, 4, D_C_SHAPE)
    pair.d.call("pull_cache", by_id(pair.pid, p_cache, 2), "c", 1)
    for i in range(4):
        dst.t[i][1] = src.t[i][2]
    dst.check(pair.d, "c")
    pair.d.call("pull_cache", by_id(pair.pid, p_cache, 3), "c", 2, 100)       # 100 bytes
    for i in range(4):
        dst.t[i][2, :100] = src.t[i][3, :100]
    pair.d.call("pull_cache", by_id(pair.pid, p_cache, 0), "c", 0,             # layer 1 -> 0
                src_layer_range=range(1, 2), dst_layer_range=range(0, 1))
    dst.t[0][0], dst.t[1][0] = src.t[2][0], src.t[3][0]
    dst.check(pair.d, "c")
    src.check(pair.p, "c")
    assert pair.d.call("transports_used", pair.pid) == ["mooncake"]


def test_pull_blocks_layer_ranges(pair):
    # Registered user memory (what engines do) and a pool allocation, both remote-accessible.
    pair.p.call("register", "rb", 4, B_SHAPE, seed=21, model_id=0)
    pair.p.call("allocate", "ab", 4, B_SHAPE, seed=22, blocks=True, model_id=1)
    pair.d.call("allocate", "db", 4, B_SHAPE, seed=23, blocks=True)
    reg, alloc, dst = Model(21, 4, B_SHAPE), Model(22, 4, B_SHAPE), Model(23, 4, B_SHAPE)
    pair.d.call("pull_blocks", key("BlocksCacheKey", pair.pid, 0), "db", [0, 3, 5], [1, 2, 7])
    for i in range(4):
        for s, d in ((0, 1), (3, 2), (5, 7)):
            dst.t[i][d] = reg.t[i][s]
    dst.check(pair.d, "db")
    pair.d.call("pull_blocks", key("BlocksCacheKey", pair.pid, 1), "db", [4, 6], [3, 0],
                src_layer_range=range(1, 2), dst_layer_range=range(0, 1))      # layer 1 -> 0
    for s, d in ((4, 3), (6, 0)):
        dst.t[0][d], dst.t[1][d] = alloc.t[2][s], alloc.t[3][s]
    pair.d.call("pull_blocks", key("BlocksCacheKey", pair.pid, 0), "db", [7], [4],
                src_layer_range=range(3, 4), dst_layer_range=range(1, 2),
                tensor_num_per_layer=1)                                        # tensor 3 -> 1
    dst.t[1][4] = reg.t[3][7]
    dst.check(pair.d, "db")
    reg.check(pair.p, "rb")


def test_push_blocks(pair):
    """The prompt writes into the decoder's registered blocks over the link the decoder made."""
    push_blocks_and_check(pair, dst_seed=31, src_seed=32, model_id=7, fast_s=FAST_S)
    assert pair.p.call("transports_used", pair.did) == ["mooncake"]


def pull_all_blocks_reversed(pair, name, shape, model_id, seed):
    """The decoder pulls every block of a fresh prompt blocks cache in reverse order."""
    pair.p.call("allocate", name, 4, shape, seed=seed, blocks=True, model_id=model_id)
    pair.d.call("allocate", name, 4, shape, seed=seed + 1, blocks=True)
    src, dst = Model(seed, 4, shape), Model(seed + 1, 4, shape)
    order = list(range(shape[0]))
    pair.d.call("pull_blocks", key("BlocksCacheKey", pair.pid, model_id), name, order, order[::-1])
    for i in range(4):
        dst.t[i] = src.t[i].flip(0)
    dst.check(pair.d, name)
    pair.d.call("deallocate", name)
    pair.p.call("deallocate", name)


def test_many_blocks_byte_exact(pair):
    """8 MiB in 64 blocks, reversed (one Mooncake batch; runs of blocks are not adjacent)."""
    pull_all_blocks_reversed(pair, "lb", L_SHAPE, model_id=2, seed=41)


def test_more_segments_than_one_mooncake_batch(pair):
    """3000 single 128-byte blocks per tensor, reversed: 12000 segments, several batches."""
    pull_all_blocks_reversed(pair, "many", [3000, 64], model_id=5, seed=45)


def test_pull_from_freed_cache_fails_cleanly(pair):
    p_cache = pair.p.call("allocate", "gone", 2, C_SHAPE, seed=51)
    pair.d.call("allocate", "gone", 2, D_C_SHAPE, seed=52)
    pair.p.call("deallocate", "gone")
    with raises_code(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, FAST_S):
        pair.d.call("pull_cache", by_id(pair.pid, p_cache, 0), "gone", 0)
    Model(52, 2, D_C_SHAPE).check(pair.d, "gone")


# ---- faults ------------------------------------------------------------------------------------
def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_cable_pulled_mid_pull_then_relink():
    timeout_ms = 3000
    with VethPair() as net, Harness() as h:
        pair = start_pair(h, [(net.ns[0], net.ip[0]), (net.ns[1], net.ip[1])],
                          sync_timeout_ms=timeout_ms, pool=200 << 20)
        shape = [64] + BIG_BLOCK                      # 64 MiB per tensor, 128 MiB per pull
        pair.p.call("allocate", "big", 2, shape, seed=61, blocks=True, model_id=3, timeout=60)
        pair.d.call("allocate", "big", 2, shape, seed=62, blocks=True, timeout=60)
        bkey = key("BlocksCacheKey", pair.pid, 3)
        blocks = list(range(64))
        pair.d.call("start_series", bkey, "big", blocks, blocks, 60.0)
        _wait_for(lambda: pair.d.call("series_count") >= 1, 30, "a first complete pull")
        net.set_link(False)
        try:
            error = pair.d.call("series_result", 20.0, timeout=30)["error"]
        finally:
            net.set_link(True)
        assert error["status_code"] in (int(LLMStatusCode.LLM_TIMEOUT),
                                        int(LLMStatusCode.LLM_LINK_FAILED)), error
        assert error["call_s"] < timeout_ms / 1000 + 1.5, error

        # The link is broken: unlink (force) and link again, then pull what the cable cut.
        result = pair.d.call("unlink_from", pair.pid, pair.pip, pair.port, True)
        assert result["overall"] == 0, result
        deadline = time.monotonic() + 20
        while True:  # the veth link needs a moment to carry traffic again
            result = pair.d.call("link_to", pair.pid, pair.pip, pair.port, 2000)
            if result["overall"] == 0 or time.monotonic() > deadline:
                break
        assert result == {"overall": 0, "per": [0]}, result
        pair.d.call("allocate", "after", 2, [4] + BIG_BLOCK, seed=63, blocks=True)
        pair.d.call("pull_blocks", bkey, "after", [0, 17, 40, 63], [3, 2, 1, 0])
        src, dst = Model(61, 2, shape), Model(63, 2, [4] + BIG_BLOCK)
        for i in range(2):
            for s, d in ((0, 3), (17, 2), (40, 1), (63, 0)):
                dst.t[i][d] = src.t[i][s]
        dst.check(pair.d, "after")
        stop_pair(pair)


def test_peer_killed_mid_pull():
    """On loopback: the prompt dies (SIGKILL) during a series of large pulls; the decoder's pull
    fails fast (connection refused or reset), never hangs."""
    with Harness() as h:
        pair = start_pair(h, [(None, "127.0.0.1"), (None, "127.0.0.1")], sync_timeout_ms=5000,
                          pool=80 << 20)
        shape = [32] + BIG_BLOCK
        pair.p.call("allocate", "big", 2, shape, seed=71, blocks=True, model_id=4, timeout=60)
        pair.d.call("allocate", "big", 2, shape, seed=72, blocks=True, timeout=60)
        blocks = list(range(32))
        pair.d.call("start_series", key("BlocksCacheKey", pair.pid, 4), "big", blocks, blocks, 60.0)
        _wait_for(lambda: pair.d.call("series_count") >= 1, 30, "a first complete pull")
        pair.p.kill()
        error = pair.d.call("series_result", 20.0, timeout=30)["error"]
        assert error["status_code"] in (int(LLMStatusCode.LLM_TIMEOUT),
                                        int(LLMStatusCode.LLM_LINK_FAILED)), error
        assert error["call_s"] < 5.0 + 1.5, error
        result = pair.d.call("unlink_from", pair.pid, pair.pip, pair.port, True)
        assert result["overall"] == 0, result
        pair.d.finish(30)


def test_staged_pull_and_push_between_hosts(monkeypatch):
    """The device-memory path across hosts: every transfer goes through the owner's staging
    area (forced on CPU), which its Mooncake agent registers, and over mooncake."""
    monkeypatch.setenv("LLM_DATADIST_TORCH_STAGE_TRANSFERS", "1")  # inherited by both children
    with topology("two_hosts") as where, Harness() as h:
        pair = start_pair(h, where)
        pair.p.call("allocate", "ab", 4, B_SHAPE, seed=41, blocks=True, model_id=0)
        pair.d.call("allocate", "db", 4, B_SHAPE, seed=42, blocks=True)
        src, dst = Model(41, 4, B_SHAPE), Model(42, 4, B_SHAPE)
        pair.d.call("pull_blocks", key("BlocksCacheKey", pair.pid, 0), "db", [2, 7], [5, 0],
                    src_layer_range=range(1, 2), dst_layer_range=range(1, 2))
        for i in (2, 3):
            dst.t[i][5], dst.t[i][0] = src.t[i][2], src.t[i][7]
        dst.check(pair.d, "db")
        pair.d.call("register", "pb", 4, B_SHAPE, seed=43, model_id=5)
        pair.p.call("register", "pb", 4, B_SHAPE, seed=44, model_id=5)
        target, pushed = Model(43, 4, B_SHAPE), Model(44, 4, B_SHAPE)
        pair.p.call("push_blocks", key("BlocksCacheKey", pair.did, 5), "pb", [1, 6], [3, 4])
        for i in range(4):
            target.t[i][3], target.t[i][4] = pushed.t[i][1], pushed.t[i][6]
        target.check(pair.d, "pb")
        assert pair.d.call("transports_used", pair.pid) == ["mooncake"]
        staging = [n for n in os.listdir("/dev/shm") if f".{pair.p.pid}." in n and ".staging." in n]
        assert staging, "the prompt's staging area should exist"
        stop_pair(pair)
