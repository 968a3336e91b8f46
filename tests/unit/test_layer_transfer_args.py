"""`transfer_cache_async` (spec §15.14): argument checks in the spec's order, task results, the
v1 entry point, and the behaviour after `finalize()`.

Two clusters in one process (local transport) linked over real sockets on 127.0.0.1; the
multi-process behaviour is in tests/integration/test_transfer_cache_async.py.
"""
import threading

import pytest
import torch

from helpers import link_in_process, raises_llm
from llm_datadist_torch import (BlocksCacheKey, CacheDesc, DataType, LayerSynchronizer, LLMRole,
                                LLMStatusCode, Placement, TransferConfig,
                                TransferWithCacheKeyConfig)

SUCCESS, PARAM = LLMStatusCode.LLM_SUCCESS, LLMStatusCode.LLM_PARAM_INVALID
SHAPE = [2, 64]  # 2 slots (or blocks) of 256 bytes per float32 tensor


class Recorder(LayerSynchronizer):
    """Lets every layer go (or blocks until `release` is set) and records the layers asked."""

    def __init__(self, release=None):
        self.asked = []
        self.release = release

    def synchronize_layer(self, layer_index, timeout_in_millis):
        self.asked.append((layer_index, timeout_in_millis))
        return self.release is None or self.release.wait(10)


def cache(manager, num_tensors=4, placement=Placement.DEVICE, blocks=False, seed=0):
    desc = CacheDesc(num_tensors, SHAPE, DataType.DT_FLOAT, placement)
    made = manager.allocate_blocks_cache(desc) if blocks else manager.allocate_cache(desc)
    for index, tensor in enumerate(made.tensors):
        tensor.copy_(torch.arange(128, dtype=torch.float32).view(SHAPE) + 1000 * index + seed)
    return made


def test_argument_checks_in_spec_order(linked_pair):
    destination, source = linked_pair  # the source pushes over the link it made
    manager = source.cache_manager
    src, dst = cache(manager), cache(destination.cache_manager)
    sync = Recorder()
    good = [TransferConfig(destination.cluster_id, dst.tensor_addrs)]
    for bad_cache in (None, "cache"):  # spec conformance 13
        with pytest.raises(TypeError):
            manager.transfer_cache_async(bad_cache, None, good)
    with pytest.raises(TypeError):
        manager.transfer_cache_async(src, None, good)
    with raises_llm(PARAM):
        manager.transfer_cache_async(cache(manager, placement=Placement.HOST), sync, good)
    with pytest.raises(TypeError):
        manager.transfer_cache_async(src, sync, good, dst_block_indices="0")
    with pytest.raises(ValueError):
        manager.transfer_cache_async(src, sync, good, dst_block_indices=[-1])
    with pytest.raises(ValueError):
        manager.transfer_cache_async(src, sync, good, src_block_indices=[2**64])
    with pytest.raises(TypeError):
        manager.transfer_cache_async(src, sync, good, [0], [0], "256")
    with raises_llm(PARAM, match="blocks to cache"):
        manager.transfer_cache_async(src, sync, good, src_block_indices=[0])
    with raises_llm(PARAM):
        manager.transfer_cache_async(src, sync, good, [0, 1], [0])
    with raises_llm(PARAM, match="dst_block_memory_size is required"):
        manager.transfer_cache_async(src, sync, good, dst_block_indices=[0])
    with pytest.raises(TypeError):
        manager.transfer_cache_async(src, object(), good)
    with pytest.raises(TypeError):
        manager.transfer_cache_async(src, sync, good[0])
    with pytest.raises(TypeError):  # key configs only in remote-cache-accessible mode
        manager.transfer_cache_async(src, sync, [TransferWithCacheKeyConfig(
            BlocksCacheKey(destination.cluster_id), range(0, 1), range(0, 1))])
    with raises_llm(PARAM):
        manager.transfer_cache_async(src, sync, good, dst_block_memory_size=256)
    with raises_llm(PARAM, match="not K and V"):
        manager.transfer_cache_async(cache(manager, num_tensors=3), sync, good)
    blocks_src = cache(manager, blocks=True)
    with raises_llm(PARAM, match="src_batch_index"):
        manager.transfer_cache_async(blocks_src, sync, [TransferConfig(
            destination.cluster_id, dst.tensor_addrs, src_batch_index=1)], [0], [0])
    with raises_llm(PARAM, match="outside the 2 layers"):
        manager.transfer_cache_async(src, sync, [TransferConfig(
            destination.cluster_id, dst.tensor_addrs * 2, range(0, 4))])
    with raises_llm(PARAM, match="dst_addrs"):
        manager.transfer_cache_async(src, sync, [TransferConfig(destination.cluster_id,
                                                                dst.tensor_addrs[:3])])
    assert sync.asked == []  # nothing started


def test_key_config_checks_in_remote_accessible_mode(make_linked_pair):
    destination, source = make_linked_pair(enable_remote_cache_accessible=True)
    manager = source.cache_manager
    src, dst = cache(manager), cache(destination.cache_manager)
    with pytest.raises(TypeError):
        manager.transfer_cache_async(src, Recorder(), [TransferConfig(destination.cluster_id,
                                                                      dst.tensor_addrs)])
    config = TransferWithCacheKeyConfig(BlocksCacheKey(destination.cluster_id), range(0, 1),
                                        range(0, 1))
    config.dst_layer_range = None  # the setter allows it; a task cannot map the layers then
    with raises_llm(PARAM, match="dst_layer_range"):
        manager.transfer_cache_async(src, Recorder(), [config])


def test_pushes_the_layers_and_fills_a_missing_range_in_place(linked_pair):
    destination, source = linked_pair
    src, dst = cache(source.cache_manager, seed=5), cache(destination.cache_manager)
    config = TransferConfig(destination.cluster_id, [addr + 256 for addr in dst.tensor_addrs],
                            src_batch_index=0)
    sync = Recorder()
    task = source.cache_manager.transfer_cache_async(src, sync, [config])
    assert config.src_layer_range == range(0, 2)
    assert task.synchronize() == SUCCESS and task.get_results() == [SUCCESS]
    assert sync.asked == [(0, None), (1, None)]
    for mine, theirs in zip(src.tensors, dst.tensors):
        assert torch.equal(theirs[1], mine[0])  # slot 0 into the pre-offset slot 1
        assert not torch.equal(theirs[0], mine[0])


def test_synchronize_times_out_while_a_layer_is_not_ready(linked_pair):
    destination, source = linked_pair
    src, dst = cache(source.cache_manager, seed=9), cache(destination.cache_manager)
    release = threading.Event()
    task = source.cache_manager.transfer_cache_async(
        src, Recorder(release), [TransferConfig(destination.cluster_id, dst.tensor_addrs)])
    assert task.synchronize(20) == LLMStatusCode.LLM_TIMEOUT
    assert task.get_results(0) == [LLMStatusCode.LLM_TIMEOUT]
    release.set()
    assert task.synchronize(10_000) == SUCCESS
    assert torch.equal(dst.tensors[3][0], src.tensors[3][0])


def test_layers_nobody_wants_are_skipped_and_results_share_a_cluster(linked_pair):
    destination, source = linked_pair
    src = cache(source.cache_manager, num_tensors=8, seed=3)
    dst = cache(destination.cache_manager)
    configs = [TransferConfig(destination.cluster_id, dst.tensor_addrs[:2], range(1, 2)),
               TransferConfig(destination.cluster_id, dst.tensor_addrs[2:], range(3, 4))]
    sync = Recorder()
    task = source.cache_manager.transfer_cache_async(src, sync, configs)
    assert task.get_results() == [SUCCESS, SUCCESS]
    assert [layer for layer, _ in sync.asked] == [1, 3]
    for index, src_index in ((0, 2), (1, 3), (2, 6), (3, 7)):
        assert torch.equal(dst.tensors[index][0], src.tensors[src_index][0])


def test_v1_kv_cache_manager_entry_point(make_v1_datadist):
    destination = make_v1_datadist(role=LLMRole.PROMPT,
                                   listen_ip_info="127.0.0.1:0")
    source = make_v1_datadist()
    link_in_process(source, destination)
    src = source.kv_cache_manager.allocate_cache(CacheDesc(2, SHAPE, DataType.DT_FLOAT))
    dst = destination.kv_cache_manager.allocate_cache(CacheDesc(2, SHAPE, DataType.DT_FLOAT))
    for index in range(2):
        source.kv_cache_manager.get_cache_tensors(src, index)[0].fill_(index + 1)
    task = source.kv_cache_manager.transfer_cache_async(
        src, Recorder(), [TransferConfig(destination.cluster_id, dst.per_device_tensor_addrs[0])])
    assert task.synchronize() == SUCCESS
    for index in range(2):
        received = destination.kv_cache_manager.get_cache_tensors(dst, index)[0]
        assert bool((received[0] == index + 1).all())  # batch slot 0 goes
        assert bool((received[1] == 0).all())  # slot 1 does not


def test_after_finalize_the_task_reports_param_invalid(linked_pair):
    destination, source = linked_pair
    src, dst = cache(source.cache_manager), cache(destination.cache_manager)
    manager = source.cache_manager
    source.finalize()
    task = manager.transfer_cache_async(src, Recorder(),
                                        [TransferConfig(destination.cluster_id, dst.tensor_addrs)])
    assert task.get_results() == [PARAM] and task.synchronize() == PARAM
