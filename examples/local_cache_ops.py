"""Allocate a paged KV cache, fill it through torch views, swap blocks to host and back.

Run: python examples/local_cache_ops.py
"""
import torch

import llm_datadist_torch as llm_datadist
from llm_datadist_torch import (BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist,
                                LLMRole, Placement)

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 64, 16, 8, 64


def main() -> None:
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    config.mem_pool_cfg = '{"memory_size": 67108864}'       # 64 MiB device pool
    config.host_mem_pool_cfg = '{"memory_size": 67108864}'  # 64 MiB host pool
    datadist = LLMDataDist(LLMRole.PROMPT, cluster_id=1)
    datadist.init(config.generate_options())
    try:
        manager = datadist.cache_manager
        shape = [NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM]
        # One K and one V tensor per layer: K0, V0, K1, V1, ...
        device_cache = manager.allocate_blocks_cache(
            CacheDesc(2 * NUM_LAYERS, shape, DataType.DT_FLOAT16, Placement.DEVICE),
            BlocksCacheKey(cluster_id=1, model_id=0))
        host_cache = manager.allocate_blocks_cache(
            CacheDesc(2 * NUM_LAYERS, shape, DataType.DT_FLOAT16, Placement.HOST))

        kv = device_cache.tensors  # torch views that share the cache memory
        for tensor in kv:
            tensor.copy_(torch.randn(shape, dtype=torch.float16))
        original = [tensor.clone() for tensor in kv]

        manager.swap_blocks(device_cache, host_cache, {0: 10, 1: 11, 2: 12})  # offload
        for tensor in kv:
            tensor[0:3].zero_()
        manager.swap_blocks(host_cache, device_cache, {10: 0, 11: 1, 12: 2})  # reload
        manager.copy_blocks(device_cache, {2: [40, 41]})                       # copy-on-write

        for layer_tensor, before in zip(kv, original):
            assert torch.equal(layer_tensor[:3], before[:3])
            assert torch.equal(layer_tensor[40], before[2]) and torch.equal(layer_tensor[41], before[2])
        print(f"ok: {len(kv)} tensors of {list(shape)} {DataType.DT_FLOAT16} on {kv[0].device}; "
              f"3 blocks swapped out and back, block 2 copied to 40 and 41 "
              f"(llm_datadist_torch {llm_datadist.__version__})")
        manager.deallocate_blocks_cache(host_cache)
        manager.deallocate_blocks_cache(device_cache)
    finally:
        datadist.finalize()


if __name__ == "__main__":
    main()
