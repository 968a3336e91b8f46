"""Layer ranges (§15.20), LayerSynchronizer, TransferConfig, TransferWithCacheKeyConfig,
CacheTask (with real threads), MemInfo, TensorDesc (spec §16-21.5)."""
import threading

import pytest

from llm_datadist_torch.data_type import DataType
from llm_datadist_torch.enums import Memtype
from llm_datadist_torch.keys import BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex
from llm_datadist_torch.ops import task_pool
from llm_datadist_torch.status import LLMStatusCode
from llm_datadist_torch.transfer_types import (
    CacheTask, LayerSynchronizer, MemInfo, TensorDesc, TransferConfig, TransferWithCacheKeyConfig,
    check_strict_layer_range, pull_layer_ranges_to_tensor_indices, pull_layer_tensor_indices)
from helpers import raises_llm

PARAM = LLMStatusCode.LLM_PARAM_INVALID
SUCCESS = LLMStatusCode.LLM_SUCCESS
TIMEOUT = LLMStatusCode.LLM_TIMEOUT


# -- pull form -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_range", [None, range(0), range(3, 3), range(3, 1), range(-3, -5)])
def test_pull_form_none_and_empty(layer_range):
    assert pull_layer_tensor_indices(layer_range, 2, "src_layer_range") == []


@pytest.mark.parametrize("layer_range,n,expected", [
    (range(0, 1), 2, [0, 1]),
    (range(1, 3), 2, [2, 3, 4, 5]),
    (range(2, 4), 3, [6, 7, 8, 9, 10, 11]),
    (range(1), 1, [0]),
    (range(5, 6), 4, [20, 21, 22, 23]),
])
def test_pull_form_indices(layer_range, n, expected):
    assert pull_layer_tensor_indices(layer_range, n, "dst_layer_range") == expected


@pytest.mark.parametrize("bad", [[0, 1], (0, 1), "0", 1])
def test_pull_form_type(bad):
    with pytest.raises(TypeError):
        pull_layer_tensor_indices(bad, 2, "src_layer_range")


@pytest.mark.parametrize("bad", [range(0, 4, 2), range(3, 1, -1), range(0, 0, 2)])
def test_pull_form_step(bad):
    with raises_llm():
        pull_layer_tensor_indices(bad, 2, "src_layer_range")


def test_pull_form_negative_start():
    with raises_llm():
        pull_layer_tensor_indices(range(-1, 2), 2, "src_layer_range")


@pytest.mark.parametrize("bad", [range(2**32, 2**32 + 1), range(0, 2**32 + 1), range(0, 2**70)])
def test_pull_form_uint32(bad):
    with pytest.raises(ValueError):
        pull_layer_tensor_indices(bad, 2, "src_layer_range")


def test_pull_form_pair_order():
    assert pull_layer_ranges_to_tensor_indices(range(1, 2), None, 2) == ([2, 3], [])
    assert pull_layer_ranges_to_tensor_indices(range(0, 1), range(3, 4), 2) == ([0, 1], [6, 7])
    with pytest.raises(TypeError):  # both types before any step
        pull_layer_ranges_to_tensor_indices(range(0, 4, 2), [0], 2)
    with raises_llm():  # both steps before any value
        pull_layer_ranges_to_tensor_indices(range(2**33, 2**33 + 1), range(0, 2, 2), 2)
    with pytest.raises(ValueError):
        pull_layer_ranges_to_tensor_indices(range(2**33, 2**33 + 1), range(-1, 1), 2)


# -- strict form -------------------------------------------------------------------------------

def test_strict_form():
    check_strict_layer_range(range(0, 1), "r", allow_none=False)
    check_strict_layer_range(range(3, 10), "r", allow_none=True)
    check_strict_layer_range(None, "r", allow_none=True)
    with pytest.raises(TypeError):
        check_strict_layer_range(None, "r", allow_none=False)
    for bad in ([0, 1], (0, 1), "x", 3):
        with pytest.raises(TypeError):
            check_strict_layer_range(bad, "r", allow_none=True)
    for bad in (range(0, 4, 2), range(0), range(3, 3), range(3, 1), range(-1, 2)):
        with raises_llm():
            check_strict_layer_range(bad, "r", allow_none=True)


# -- LayerSynchronizer -----------------------------------------------------------------------------

def test_layer_synchronizer_is_abstract():
    with pytest.raises(TypeError):
        LayerSynchronizer()

    class Incomplete(LayerSynchronizer):
        pass

    with pytest.raises(TypeError):
        Incomplete()

    class Always(LayerSynchronizer):
        def synchronize_layer(self, layer_index, timeout_in_millis):
            return True

    assert Always().synchronize_layer(0, None) is True
    assert isinstance(Always(), LayerSynchronizer)


# -- TransferConfig --------------------------------------------------------------------------------

def test_transfer_config_defaults_and_repr():
    cfg = TransferConfig(2, [10, 20])
    assert cfg.dst_cluster_id == 2
    assert cfg.dst_addrs == [10, 20]
    assert cfg.src_layer_range is None
    assert cfg.src_batch_index == 0
    assert cfg.dst_layer_range is None
    text = ("TransferConfig(dst_cluster_id=2, dst_addrs=[10, 20], src_layer_range=None, "
            "src_batch_index=0)")
    assert repr(cfg) == text and str(cfg) == text
    cfg = TransferConfig(3, (1, 2, 3, 4), range(1, 3), 5)
    assert repr(cfg) == ("TransferConfig(dst_cluster_id=3, dst_addrs=(1, 2, 3, 4), "
                         "src_layer_range=range(1, 3), src_batch_index=5)")


@pytest.mark.parametrize("args,exc", [
    (("1", [1]), TypeError), ((None, [1]), TypeError), ((-1, [1]), ValueError),
    ((2**64, [1]), ValueError),
    ((1, None), TypeError), ((1, 5), TypeError), ((1, "12"), TypeError), ((1, [1, "2"]), TypeError),
    ((1, [1, None]), TypeError), ((1, [-1]), ValueError), ((1, [2**64]), ValueError),
    ((1, [1], [0, 1]), TypeError),
    ((1, [1], None, -1), ValueError), ((1, [1], None, 2**32), ValueError),
    ((1, [1], None, "0"), TypeError), ((1, [1], None, None), TypeError),
    ((-1, None), ValueError),  # dst_cluster_id is checked first
    ((1, [-1], "r"), ValueError),  # then dst_addrs
    (("1", None, range(0), -1), TypeError),
])
def test_transfer_config_checks(args, exc):
    with pytest.raises(exc):
        TransferConfig(*args)


@pytest.mark.parametrize("bad", [range(0), range(2, 1), range(0, 4, 2), range(-1, 1)])
def test_transfer_config_strict_range(bad):
    with raises_llm():
        TransferConfig(1, [1], bad)


def test_transfer_config_setters_recheck():
    cfg = TransferConfig(1, [1, 2], range(0, 1))
    cfg.dst_cluster_id = 9
    cfg.dst_addrs = (5, 6)
    cfg.src_layer_range = None
    cfg.src_batch_index = 4
    assert (cfg.dst_cluster_id, cfg.dst_addrs, cfg.src_layer_range, cfg.src_batch_index) == (
        9, (5, 6), None, 4)
    with pytest.raises(ValueError):
        cfg.dst_cluster_id = -1
    with pytest.raises(TypeError):
        cfg.dst_addrs = None
    with pytest.raises(ValueError):
        cfg.dst_addrs = [-1]
    with pytest.raises(TypeError):
        cfg.src_layer_range = [0]
    with raises_llm():
        cfg.src_layer_range = range(0)
    with pytest.raises(ValueError):
        cfg.src_batch_index = -1
    assert (cfg.dst_cluster_id, cfg.dst_addrs, cfg.src_layer_range, cfg.src_batch_index) == (
        9, (5, 6), None, 4)
    cfg.dst_layer_range = range(3)  # plain attribute
    assert cfg.dst_layer_range == range(3)


# -- TransferWithCacheKeyConfig --------------------------------------------------------------------

def test_key_config_basic_and_repr():
    key = CacheKeyByIdAndIndex(4, 1, 2)
    cfg = TransferWithCacheKeyConfig(key, range(0, 2), range(3, 5), 1)
    assert cfg.cache_key is key
    assert cfg.src_layer_range == range(0, 2) and cfg.dst_layer_range == range(3, 5)
    assert cfg.src_batch_index == 1
    assert cfg.dst_cluster_id == 4
    assert repr(cfg) == ("TransferWithCacheKeyConfig(cache_key=CacheKeyByIdAndIndex(cluster_id=4, "
                         "cache_id=1, batch_index=2), src_layer_range=range(0, 2), "
                         "dst_layer_range=range(3, 5), src_batch_index=1)")
    blocks = TransferWithCacheKeyConfig(BlocksCacheKey(7), range(0, 1), range(0, 1))
    assert blocks.dst_cluster_id == 7 and blocks.src_batch_index == 0


def test_key_config_checks():
    key = BlocksCacheKey(1)
    for bad_key in (None, CacheKey(1, 1), 1):
        with pytest.raises(TypeError):
            TransferWithCacheKeyConfig(bad_key, range(1), range(1))
    with pytest.raises(TypeError):  # ranges are required
        TransferWithCacheKeyConfig(key)
    with pytest.raises(TypeError):
        TransferWithCacheKeyConfig(key, range(1), None)
    with pytest.raises(TypeError):
        TransferWithCacheKeyConfig(key, [0], range(1))
    with raises_llm():
        TransferWithCacheKeyConfig(key, range(0), range(1))
    with raises_llm():
        TransferWithCacheKeyConfig(key, range(1), range(0, 2, 2))
    with raises_llm(match="size"):
        TransferWithCacheKeyConfig(key, range(0, 2), range(0, 3))
    with raises_llm(match="size"):  # same stop, different lengths
        TransferWithCacheKeyConfig(key, range(1, 3), range(0, 3))
    with pytest.raises(ValueError):
        TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(1, 1), range(1), range(1), -1)
    with pytest.raises(TypeError):
        TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(1, 1), range(1), range(1), None)
    with raises_llm(match="BlocksCacheKey"):
        TransferWithCacheKeyConfig(key, range(1), range(1), 1)
    with pytest.raises(ValueError):  # constructor: uint32 before the blocks-key rule
        TransferWithCacheKeyConfig(key, range(1), range(1), -1)
    with pytest.raises(TypeError):  # order: cache_key before ranges
        TransferWithCacheKeyConfig(None, None, None)
    with raises_llm(match="size"):  # order: lengths before src_batch_index
        TransferWithCacheKeyConfig(key, range(1), range(2), -1)


def test_key_config_setters():
    key = BlocksCacheKey(1)
    cfg = TransferWithCacheKeyConfig(key, range(0, 1), range(0, 1))
    with raises_llm():  # setter: blocks-key rule before uint32
        cfg.src_batch_index = -1
    cfg.src_batch_index = 0
    cfg.src_layer_range = None
    cfg.dst_layer_range = None
    assert cfg.src_layer_range is None and cfg.dst_layer_range is None
    cfg.src_layer_range = range(2, 4)
    with raises_llm():
        cfg.dst_layer_range = range(0)
    with pytest.raises(TypeError):
        cfg.dst_layer_range = [1]
    cfg.cache_key = CacheKeyByIdAndIndex(9, 1)
    assert cfg.dst_cluster_id == 1  # not refreshed by the setter (upstream quirk)
    cfg.src_batch_index = 3
    with pytest.raises(ValueError):
        cfg.src_batch_index = 2**32
    assert cfg.src_batch_index == 3
    with pytest.raises(TypeError):
        cfg.cache_key = CacheKey(1, 1)
    cfg.cache_key = None  # the setter accepts None
    assert cfg.cache_key is None


# -- CacheTask -------------------------------------------------------------------------------

def make_task(configs, outcome, gate=None):
    """A job on the real task pool that waits on `gate`, then records `outcome` into the results."""
    results = {}

    def work():
        if gate is not None:
            gate.wait(10)
        results.update(outcome)

    return CacheTask(task_pool.submit(work), configs, results)


def configs_for(*cluster_ids):
    return [TransferConfig(cid, [1, 2], range(0, 1)) for cid in cluster_ids]


def test_cache_task_success():
    task = make_task(configs_for(1, 2), {1: SUCCESS, 2: SUCCESS})
    assert task.synchronize() is SUCCESS
    assert task.get_results() == [SUCCESS, SUCCESS]
    assert task.synchronize(0) is SUCCESS  # finished: a zero timeout still gives the result


def test_cache_task_first_failure_in_config_order():
    outcome = {1: LLMStatusCode.LLM_NOT_YET_LINK, 2: PARAM, 3: SUCCESS}
    task = make_task(configs_for(3, 2, 1), outcome)
    assert task.synchronize() is PARAM
    assert task.get_results() == [SUCCESS, PARAM, LLMStatusCode.LLM_NOT_YET_LINK]


def test_cache_task_unreached_configs_are_none():
    task = make_task(configs_for(1, 2, 3), {1: SUCCESS})
    assert task.get_results() == [SUCCESS, None, None]
    assert task.synchronize() is SUCCESS  # None is ignored
    task = make_task(configs_for(1, 2), {2: TIMEOUT})
    assert task.synchronize() is TIMEOUT
    assert task.get_results() == [None, TIMEOUT]


def test_cache_task_shared_cluster_shares_result():
    task = make_task(configs_for(5, 5, 6), {5: PARAM, 6: SUCCESS})
    assert task.get_results() == [PARAM, PARAM, SUCCESS]


def test_cache_task_key_configs_use_dst_cluster_id_attribute():
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(8), range(0, 1), range(0, 1))
    cfg.cache_key = BlocksCacheKey(9)
    task = make_task([cfg], {8: SUCCESS})
    assert task.get_results() == [SUCCESS]


def test_cache_task_timeout_then_result():
    gate = threading.Event()
    task = make_task(configs_for(1, 2), {1: SUCCESS, 2: LLMStatusCode.LLM_FAILED}, gate)
    assert task.synchronize(10) is TIMEOUT
    assert task.get_results(0) == [TIMEOUT, TIMEOUT]
    assert task.get_results(20) == [TIMEOUT, TIMEOUT]
    gate.set()
    assert task.synchronize() is LLMStatusCode.LLM_FAILED  # the transfer kept running
    assert task.get_results(5) == [SUCCESS, LLMStatusCode.LLM_FAILED]


def test_cache_task_waits_forever_by_default():
    gate = threading.Event()
    task = make_task(configs_for(1), {1: SUCCESS}, gate)
    threading.Timer(0.05, gate.set).start()
    assert task.synchronize() is SUCCESS


def test_cache_task_timeout_validation():
    task = make_task(configs_for(1), {1: SUCCESS})
    for method in (task.synchronize, task.get_results):
        for bad in (-1, 2**32):
            with pytest.raises(ValueError):
                method(bad)
        for bad in ("1", 1.5):
            with pytest.raises(TypeError):
                method(bad)
    assert task.synchronize(2**32 - 1) is SUCCESS


# -- MemInfo ---------------------------------------------------------------------------------------

def test_mem_info():
    info = MemInfo(Memtype.MEM_TYPE_DEVICE, 0x1000, 4096)
    assert (info.mem_type, info.addr, info.size) == (Memtype.MEM_TYPE_DEVICE, 0x1000, 4096)
    text = "MemInfo(mem_type=Memtype.MEM_TYPE_DEVICE, addr=4096, size=4096)"
    assert str(info) == text and repr(info) == text
    # No range checks at construction; None passes.
    assert MemInfo(Memtype.MEM_TYPE_HOST, 0, -1).size == -1
    none_info = MemInfo(None, None, None)
    assert none_info.mem_type is None and none_info.addr is None
    with pytest.raises(TypeError):
        MemInfo(0, 1, 1)
    with pytest.raises(TypeError):
        MemInfo(Memtype.MEM_TYPE_DEVICE, "1", 1)
    with pytest.raises(TypeError):
        MemInfo(Memtype.MEM_TYPE_DEVICE, 1, 1.0)
    with pytest.raises(AttributeError):
        info.addr = 2


# -- TensorDesc ----------------------------------------------------------------------------------

def test_tensor_desc():
    desc = TensorDesc(DataType.DT_FLOAT16, [2, 3])
    assert desc.data_type is DataType.DT_FLOAT16 and desc.shape == [2, 3]
    assert repr(desc) == "TensorDesc(data_type=DataType.DT_FLOAT16, shape=[2, 3])"
    with pytest.raises(TypeError):
        TensorDesc(1, [2])
    with pytest.raises(TypeError):
        TensorDesc(DataType.DT_FLOAT, [2, "3"])
    with pytest.raises(TypeError):
        TensorDesc(DataType.DT_FLOAT, "23")
