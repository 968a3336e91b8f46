"""CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey (spec §11-13, §26.31, §27 #3-9)."""

import pytest

from llm_datadist_torch.keys import INVALID_ID, BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex
from llm_datadist_torch.status import LLMStatusCode
from helpers import raises_llm

PARAM = LLMStatusCode.LLM_PARAM_INVALID


def test_invalid_id():
    assert INVALID_ID == 2**64 - 1


# -- CacheKey ------------------------------------------------------------------------------------

def test_conformance_3_cluster_id_required():
    with raises_llm(match="cluster_id is required"):
        CacheKey(req_id=1, model_id=1, prefix_id=1)


def test_conformance_4_req_id_required():
    with raises_llm(match="req_id is required"):
        CacheKey(cluster_id=1, model_id=1, prefix_id=1)


def test_conformance_5_unsupported_keyword():
    with raises_llm(match="Unsupported"):
        CacheKey(cluster_id=1, req_id=1, prefix_id1=1)


@pytest.mark.parametrize("make", [
    lambda: CacheKey(1, 1, 1, 1),
    lambda: CacheKey(cluster_id=1, req_id=1, model_id=1, prefix_id=1),
    lambda: CacheKey(prompt_cluster_id=1, req_id=1, model_id=1, prefix_id=1),
    lambda: CacheKey(1, 1, model_id=1, prefix_id=1),
])
def test_conformance_6_properties(make):
    key = make()
    assert (key.cluster_id, key.prompt_cluster_id, key.req_id, key.model_id, key.prefix_id) == (
        1, 1, 1, 1, 1)


def test_conformance_7_negative_cluster_id():
    with pytest.raises(ValueError):
        CacheKey(cluster_id=-1, req_id=1)


def test_cache_key_defaults():
    key = CacheKey(3, 4)
    assert key.model_id == 0
    assert key.prefix_id == INVALID_ID


def test_cache_key_param_count():
    with raises_llm(match="over limit"):
        CacheKey(1, 2, 3, 4, 5)
    with raises_llm(match="over limit"):
        CacheKey(1, 2, 3, 4, prompt_cluster_id=1)
    with raises_llm(match="over limit"):
        CacheKey(cluster_id=1, prompt_cluster_id=1, req_id=1, model_id=0, prefix_id=0)


def test_cache_key_no_args():
    with raises_llm(match="cluster_id is required"):
        CacheKey()


def test_positional_overwrites_keyword():
    key = CacheKey(1, 2, cluster_id=9)
    assert key.cluster_id == 1 and key.req_id == 2


def test_cluster_id_wins_over_prompt_cluster_id():
    key = CacheKey(cluster_id=5, prompt_cluster_id=6, req_id=1)
    assert key.cluster_id == 5 and key.prompt_cluster_id == 5


def test_cache_key_check_order():
    with raises_llm(match="cluster_id is required"):  # required before unsupported
        CacheKey(req_id=1, foo=1)
    with raises_llm(match="req_id is required"):
        CacheKey(cluster_id=1, foo=1)
    with raises_llm(match="Unsupported"):  # unsupported before the range checks
        CacheKey(cluster_id=-1, req_id=1, foo=2)
    with pytest.raises(TypeError):  # cluster_id checked before req_id
        CacheKey("1", -1)
    with pytest.raises(ValueError):
        CacheKey(1, -1, "x")


@pytest.mark.parametrize("kwargs,exc", [
    (dict(cluster_id="1", req_id=1), TypeError),
    (dict(cluster_id=None, req_id=1), TypeError),
    (dict(cluster_id=2**64, req_id=1), ValueError),
    (dict(cluster_id=1, req_id=None), TypeError),
    (dict(cluster_id=1, req_id=1.0), TypeError),
    (dict(cluster_id=1, req_id=-1), ValueError),
    (dict(cluster_id=1, req_id=2**64), ValueError),
    (dict(cluster_id=1, req_id=1, model_id=-1), ValueError),
    (dict(cluster_id=1, req_id=1, model_id="0"), TypeError),
    (dict(cluster_id=1, req_id=1, prefix_id=2**64), ValueError),
    (dict(cluster_id=1, req_id=1, prefix_id=None), TypeError),
    (dict(prompt_cluster_id=-1, req_id=1), ValueError),
])
def test_cache_key_uint64_checks(kwargs, exc):
    with pytest.raises(exc):
        CacheKey(**kwargs)


def test_cache_key_limits_accepted():
    key = CacheKey(2**64 - 1, 2**64 - 1, 2**64 - 1, 0)
    assert key.req_id == INVALID_ID and key.prefix_id == 0


def test_cache_key_repr():
    assert repr(CacheKey(1, 2, 3, 4)) == "CacheKey(cluster_id=1, req_id=2, prefix_id=4, model_id=3)"
    assert repr(CacheKey(prompt_cluster_id=7, req_id=8)) == (
        f"CacheKey(cluster_id=7, req_id=8, prefix_id={INVALID_ID}, model_id=0)")


def test_cache_key_value_equality():
    assert CacheKey(2, 0, 0) == CacheKey(cluster_id=2, req_id=0)
    assert hash(CacheKey(2, 0, 0)) == hash(CacheKey(prompt_cluster_id=2, req_id=0, model_id=0))
    assert CacheKey(2, 0) != CacheKey(3, 0)  # cluster_id is part of Python equality
    assert CacheKey(2, 0) != CacheKey(2, 0, 1)
    assert CacheKey(2, 0) != CacheKey(2, 0, 0, 5)
    assert CacheKey(1, 0) != CacheKeyByIdAndIndex(1, 0)
    assert CacheKey(1, 0) != (1, 0, 0, INVALID_ID)
    assert len({CacheKey(1, 1), CacheKey(1, 1), CacheKey(1, 2)}) == 2
    assert {CacheKey(1, 1): "a"}[CacheKey(1, 1)] == "a"


def test_cache_key_properties_read_only():
    key = CacheKey(1, 1)
    for name in ("cluster_id", "prompt_cluster_id", "req_id", "model_id", "prefix_id"):
        with pytest.raises(AttributeError):
            setattr(key, name, 2)


# -- CacheKeyByIdAndIndex ----------------------------------------------------------------------

def test_key_by_id_and_index():
    key = CacheKeyByIdAndIndex(cluster_id=3, cache_id=7, batch_index=2)
    assert (key.cluster_id, key.cache_id, key.batch_index) == (3, 7, 2)
    assert key._req_id == INVALID_ID
    assert CacheKeyByIdAndIndex(1, 2).batch_index == 0
    assert CacheKeyByIdAndIndex(1, -1).cache_id == -1  # cache_id is int64
    assert repr(key) == "CacheKeyByIdAndIndex(cluster_id=3, cache_id=7, batch_index=2)"


@pytest.mark.parametrize("args,exc", [
    (("1", 1), TypeError), ((None, 1), TypeError), ((-1, 1), ValueError), ((2**64, 1), ValueError),
    ((1, "1"), TypeError), ((1, None), TypeError), ((1, 2**63), ValueError),
    ((1, -(2**63) - 1), ValueError),
    ((1, 1, "0"), TypeError), ((1, 1, None), TypeError), ((1, 1, -1), ValueError),
    ((1, 1, 2**32), ValueError),
    (("x", 2**63, -1), TypeError),  # cluster_id first
    ((1, 2**63, "x"), ValueError),  # then cache_id
])
def test_key_by_id_and_index_checks(args, exc):
    with pytest.raises(exc):
        CacheKeyByIdAndIndex(*args)


def test_key_by_id_and_index_equality():
    assert CacheKeyByIdAndIndex(1, 2, 3) == CacheKeyByIdAndIndex(1, 2, 3)
    assert hash(CacheKeyByIdAndIndex(1, 2, 3)) == hash(CacheKeyByIdAndIndex(1, 2, 3))
    assert CacheKeyByIdAndIndex(1, 2, 3) != CacheKeyByIdAndIndex(1, 2, 4)
    assert CacheKeyByIdAndIndex(1, 2) != BlocksCacheKey(1, 2)


# -- BlocksCacheKey ----------------------------------------------------------------------------

def test_conformance_8_string_cluster_id():
    with pytest.raises(TypeError, match="only support") as info:
        BlocksCacheKey("aa")
    assert str(info.value).startswith("The first param")


def test_conformance_9_cluster_id_required():
    with raises_llm(match="cluster_id is required"):
        BlocksCacheKey(model_id=1)


def test_blocks_key_model_id_type():
    with pytest.raises(TypeError, match="only support") as info:
        BlocksCacheKey(1, "x")
    assert str(info.value).startswith("The second param")


def test_blocks_key_checks():
    with raises_llm(match="over limit"):
        BlocksCacheKey(1, 2, 3)
    with raises_llm(match="over limit"):
        BlocksCacheKey(1, 2, model_id=3)
    with raises_llm(match="Unsupported"):
        BlocksCacheKey(1, req_id=2)
    with raises_llm(match="cluster_id is required"):
        BlocksCacheKey()
    with raises_llm(match="Unsupported"):  # before the type checks
        BlocksCacheKey(cluster_id="x", foo=1)


def test_blocks_key_no_range_check_and_none_passes():
    assert BlocksCacheKey(-1).cluster_id == -1
    assert BlocksCacheKey(2**70, -5).model_id == -5
    key = BlocksCacheKey(None, None)
    assert key.cluster_id is None and key.model_id is None


def test_blocks_key_properties_and_repr():
    key = BlocksCacheKey(4)
    assert (key.cluster_id, key.prompt_cluster_id, key.model_id) == (4, 4, 0)
    assert repr(key) == "BlocksCacheKey(cluster_id=4, model_id=0)"
    key = BlocksCacheKey(prompt_cluster_id=5, model_id=2)
    assert (key.cluster_id, key.model_id) == (5, 2)
    assert repr(key) == "BlocksCacheKey(prompt_cluster_id=5, model_id=2)"
    key = BlocksCacheKey(cluster_id=5, prompt_cluster_id=6)
    assert key.cluster_id == 5
    assert repr(key) == "BlocksCacheKey(cluster_id=5, model_id=0)"


def test_blocks_key_equality():
    assert BlocksCacheKey(1, 0) == BlocksCacheKey(prompt_cluster_id=1)
    assert hash(BlocksCacheKey(1, 0)) == hash(BlocksCacheKey(prompt_cluster_id=1))
    assert BlocksCacheKey(1, 0) != BlocksCacheKey(1, 1)
    assert len({BlocksCacheKey(1), BlocksCacheKey(1), BlocksCacheKey(2)}) == 2
