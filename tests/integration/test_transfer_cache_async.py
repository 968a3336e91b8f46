"""`transfer_cache_async` between a prompt and decoders in separate processes (spec §15.14).

The prompt starts the task before "the model" has written any layer (`Agent.transfer_layers`):
the destination can only end up with the freshly written bytes if every layer was pushed after
the synchronizer let it go. Destinations are checked byte-exactly over the whole cache.
"""
import pytest

from agents import agent, key, new_cluster_id
from checks import B_SHAPE, BLOCK, C_SHAPE, D_C_SHAPE, SLOT, Model, start_pair, stop_pair
from llm_datadist_torch import LLMStatusCode

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

OK = int(LLMStatusCode.LLM_SUCCESS)
TIMEOUT = int(LLMStatusCode.LLM_TIMEOUT)
PARAM = int(LLMStatusCode.LLM_PARAM_INVALID)
C2B_SHAPE = [1, 10, 16]  # one 320-byte slot per tensor: 2.5 blocks of 128 bytes
C2B_SLOT = 320
STAGED = {"LLM_DATADIST_TORCH_STAGE_TRANSFERS": "1"}


@pytest.fixture(scope="module", params=["direct", "staged"])
def any_pair(request, module_harness):
    """Raw-address mode, bytes moved one-sidedly or through the decoder's staging area."""
    pair = start_pair(module_harness, prompt_env=STAGED if request.param == "staged" else None)
    yield pair
    stop_pair(pair)


def written(seed, num_tensors, shape):
    """The source after the task: every layer rewritten with `seed` by `transfer_layers`."""
    return Model(seed, num_tensors, shape)


def test_raw_addresses_slot_to_slot_follows_the_layers(any_pair):
    p, d = any_pair.p, any_pair.d
    p.call("allocate", "c2c_src", 8, C_SHAPE, seed=11)
    d.call("allocate", "c2c_dst", 4, D_C_SHAPE, seed=13)
    # Layers 1-2 of source slot 3 into decoder slot 2 (dst_addrs pre-offset to the slot).
    dst_addrs = [addr + 2 * SLOT for addr in d.call("addresses", "c2c_dst")]
    out = p.call("transfer_layers", "c2c_src", [("addrs", any_pair.did, dst_addrs, (1, 3), 3)], seed=12)
    assert out["early"] == TIMEOUT, out  # still waiting for layer 1 to be computed
    assert (out["final"], out["results"], out["asked"]) == (OK, [OK], [1, 2]), out
    src, dst = written(12, 8, C_SHAPE), Model(13, 4, D_C_SHAPE)
    for k in range(4):
        dst.t[k][2] = src.t[2 + k][3]
    dst.check(d, "c2c_dst")


def test_raw_addresses_slot_into_blocks(any_pair):
    p, d = any_pair.p, any_pair.d
    p.call("allocate", "c2b_src", 4, C2B_SHAPE, seed=21)
    d.call("allocate", "c2b_blk", 4, B_SHAPE, seed=23, blocks=True)
    addrs = d.call("addresses", "c2b_blk")
    out = p.call("transfer_layers", "c2b_src", [("addrs", any_pair.did, addrs, None, 0)], seed=22,
                 dst_block_indices=[5, 0, 3], dst_block_memory_size=BLOCK)
    assert (out["final"], out["results"], out["asked"]) == (OK, [OK], [0, 1]), out
    assert out["ranges"] == [(0, 2)]  # src_layer_range=None is filled in place
    src, dst = written(22, 4, C2B_SHAPE), Model(23, 4, B_SHAPE)
    for k in range(4):
        flat = src.t[k].reshape(-1)
        dst.t[k][5] = flat[0:BLOCK]
        dst.t[k][0] = flat[BLOCK:2 * BLOCK]
        dst.t[k][3][:C2B_SLOT - 2 * BLOCK] = flat[2 * BLOCK:]  # the short last chunk
    dst.check(d, "c2b_blk")


def test_raw_addresses_blocks_to_blocks(pair):
    pair.p.call("allocate", "b2b_src", 4, B_SHAPE, seed=31, blocks=True)
    pair.d.call("allocate", "b2b_dst", 4, B_SHAPE, seed=33, blocks=True)
    addrs = pair.d.call("addresses", "b2b_dst")
    out = pair.p.call("transfer_layers", "b2b_src", [("addrs", pair.did, addrs, None, 0)], seed=32,
                      src_block_indices=[1, 6], dst_block_indices=[7, 2], dst_block_memory_size=BLOCK)
    assert (out["final"], out["results"]) == (OK, [OK]), out
    src, dst = written(32, 4, B_SHAPE), Model(33, 4, B_SHAPE)
    for k in range(4):
        dst.t[k][7], dst.t[k][2] = src.t[k][1], src.t[k][6]
    dst.check(pair.d, "b2b_dst")


def test_blocks_key_maps_source_layers_onto_destination_layers(ra_pair):
    p, d = ra_pair.p, ra_pair.d
    p.call("allocate", "ra_src", 4, B_SHAPE, seed=41, blocks=True)
    d.call("allocate", "ra_dst", 2, B_SHAPE, seed=43, blocks=True, model_id=3)
    # Source layer 1 -> destination layer 0 (the intended mapping, spec §26.14).
    config = ("key", key("BlocksCacheKey", ra_pair.did, 3), (1, 2), (0, 1), 0)
    out = p.call("transfer_layers", "ra_src", [config], seed=42, src_block_indices=[0, 5],
                 dst_block_indices=[4, 1])
    assert (out["final"], out["results"], out["asked"]) == (OK, [OK], [1]), out
    src, dst = written(42, 4, B_SHAPE), Model(43, 2, B_SHAPE)
    for k in range(2):
        dst.t[k][4], dst.t[k][1] = src.t[2 + k][0], src.t[2 + k][5]
    dst.check(d, "ra_dst")


def test_cache_id_and_index_key_slot_to_slot(ra_pair):
    p, d = ra_pair.p, ra_pair.d
    p.call("allocate", "ra_c", 4, C_SHAPE, seed=51)
    cache_id = d.call("allocate", "ra_cd", 4, D_C_SHAPE, seed=53)
    config = ("key", key("CacheKeyByIdAndIndex", ra_pair.did, cache_id, 1), (0, 2), (0, 2), 2)
    out = p.call("transfer_layers", "ra_c", [config], seed=52)
    assert (out["final"], out["results"]) == (OK, [OK]), out
    src, dst = written(52, 4, C_SHAPE), Model(53, 4, D_C_SHAPE)
    for k in range(4):
        dst.t[k][1] = src.t[k][2]
    dst.check(d, "ra_cd")


def test_refused_layer_stops_the_task_after_the_layers_before_it(pair):
    pair.p.call("allocate", "refuse_src", 8, C_SHAPE, seed=61)
    pair.d.call("allocate", "refuse_dst", 6, D_C_SHAPE, seed=63)
    addrs = pair.d.call("addresses", "refuse_dst")
    out = pair.p.call("transfer_layers", "refuse_src", [("addrs", pair.did, addrs, (0, 3), 0)],
                      seed=62, refuse_layer=1)
    assert (out["final"], out["results"], out["asked"]) == (PARAM, [PARAM], [0, 1]), out
    src, dst = written(62, 8, C_SHAPE), Model(63, 6, D_C_SHAPE)
    dst.t[0][0], dst.t[1][0] = src.t[0][0], src.t[1][0]  # layer 0 only
    dst.check(pair.d, "refuse_dst")


def test_failing_synchronizer_reports_failed(pair):
    pair.p.call("allocate", "raise_src", 4, C_SHAPE, seed=71)
    pair.d.call("allocate", "raise_dst", 4, D_C_SHAPE, seed=73)
    addrs = pair.d.call("addresses", "raise_dst")
    out = pair.p.call("transfer_layers", "raise_src", [("addrs", pair.did, addrs, None, 0)], seed=72,
                      raise_layer=0)
    assert (out["final"], out["results"]) == (int(LLMStatusCode.LLM_FAILED), [int(LLMStatusCode.LLM_FAILED)])
    Model(73, 4, D_C_SHAPE).check(pair.d, "raise_dst")


@pytest.mark.parametrize("shift", [3 * SLOT, 2 * SLOT + 1], ids=["past-the-end", "straddling-the-end"])
def test_addresses_outside_the_destination_caches_are_refused(pair, shift):
    pair.p.call("allocate", "far_src", 4, C_SHAPE, seed=81)
    pair.d.call("allocate", "far_dst", 4, D_C_SHAPE, seed=83)
    addrs = pair.d.call("addresses", "far_dst")
    bad = [addrs[0], addrs[1], addrs[2] + shift, addrs[3]]  # layer 1's K is out of bounds
    out = pair.p.call("transfer_layers", "far_src", [("addrs", pair.did, bad, None, 0)], seed=82)
    assert (out["final"], out["results"]) == (PARAM, [PARAM]), out
    # All the addresses of a config are located at once, at its first layer: nothing moved.
    Model(83, 4, D_C_SHAPE).check(pair.d, "far_dst")


def _two_decoders_and_a_stranger(harness, stranger_first: bool):
    """One task to two linked decoders (layers 0-1 of slot 0, layers 2-3 into slot 1) and to an
    unlinked cluster, listed last (layer 3) or first (layer 0); returns the task's outcome after
    checking every byte the decoders got."""
    pair = start_pair(harness)
    other = harness.spawn(agent, name="decoder2")
    oid = new_cluster_id()
    other.call("init", oid, "DECODER")
    assert other.call("link", pair.pid, pair.port)["overall"] == 0
    pair.p.call("allocate", "multi_src", 8, C_SHAPE, seed=91)
    pair.d.call("allocate", "multi_dst", 4, D_C_SHAPE, seed=93)
    other.call("allocate", "multi_dst", 4, D_C_SHAPE, seed=94)
    first = pair.d.call("addresses", "multi_dst")
    second = [addr + SLOT for addr in other.call("addresses", "multi_dst")]
    linked = [("addrs", pair.did, first, (0, 2), 0), ("addrs", oid, second, (2, 4), 1)]
    stranger = ("addrs", new_cluster_id(), first[:2], (0, 1) if stranger_first else (3, 4), 0)
    configs = [stranger, *linked] if stranger_first else [*linked, stranger]
    out = pair.p.call("transfer_layers", "multi_src", configs, seed=92)
    src = written(92, 8, C_SHAPE)
    one, two = Model(93, 4, D_C_SHAPE), Model(94, 4, D_C_SHAPE)
    for k in range(4):
        one.t[k][0] = src.t[k][0]
        two.t[k][1] = src.t[4 + k][1]
    one.check(pair.d, "multi_dst")
    two.check(other, "multi_dst")
    other.call("unlink", pair.pid, pair.port)
    other.finish()
    stop_pair(pair)
    return out


def test_one_task_two_decoders_and_an_unlinked_cluster(harness):
    out = _two_decoders_and_a_stranger(harness, stranger_first=False)
    not_linked = int(LLMStatusCode.LLM_NOT_YET_LINK)
    assert out["results"] == [OK, OK, not_linked] and out["final"] == not_linked, out
    assert out["asked"] == [0, 1, 2, 3]


def test_a_failing_first_destination_does_not_stop_the_others(harness):
    """The unlinked cluster comes first and wants layer 0: it fails at once, and the two linked
    decoders still get every layer they asked for (checked inside the helper)."""
    out = _two_decoders_and_a_stranger(harness, stranger_first=True)
    assert out["results"] == [int(LLMStatusCode.LLM_NOT_YET_LINK), OK, OK], out


def test_dead_decoder_ends_in_an_error_not_a_hang(harness):
    pair = start_pair(harness, {"sync_kv_timeout": 1000})
    pair.p.call("allocate", "dead_src", 4, C_SHAPE, seed=101)
    pair.d.call("allocate", "dead_dst", 4, D_C_SHAPE, seed=103)
    addrs = pair.d.call("addresses", "dead_dst")
    pair.d.kill()
    out = pair.p.call("transfer_layers", "dead_src", [("addrs", pair.did, addrs, None, 0)], seed=102,
                      timeout=20)
    assert out["results"][0] not in (None, OK) and out["final"] == out["results"][0], out
    pair.p.finish()
