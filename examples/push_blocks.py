"""push_blocks between two processes: the decoder links to the prompt, then the prompt writes
its KV blocks straight into the decoder's cache over that link (remote-cache-accessible mode).

Run: python examples/push_blocks.py   (prints one line; exit code 1 if a byte differs)
"""
import torch

from llm_datadist_torch import BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMRole
from _two_processes import cluster_info, free_port, link, report, run_pair

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 1, 2
NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 2, 16, 16, 8, 64
SHAPE = [NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM]
SRC_BLOCKS, DST_BLOCKS = [0, 1, 2], [9, 10, 11]


def init_datadist(role, cluster_id, port):
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    config.enable_remote_cache_accessible = True
    config.mem_pool_cfg = '{"memory_size": 67108864}'
    config.listen_ip_info = f"127.0.0.1:{port}"
    datadist = LLMDataDist(role, cluster_id)
    datadist.init(config.generate_options())
    return datadist


def run_prompt(conn):
    port = free_port()
    datadist = init_datadist(LLMRole.PROMPT, PROMPT_CLUSTER_ID, port)
    manager = datadist.cache_manager
    cache = manager.allocate_blocks_cache(CacheDesc(2 * NUM_LAYERS, SHAPE, DataType.DT_FLOAT16))
    for index, tensor in enumerate(cache.tensors):  # K0, V0, K1, V1
        for block in range(NUM_BLOCKS):
            tensor[block] = index * 100 + block
    conn.send(port)
    conn.recv()  # the decoder has linked
    decoder_key = BlocksCacheKey(DECODER_CLUSTER_ID, 0)
    manager.push_blocks(decoder_key, cache, SRC_BLOCKS, DST_BLOCKS)            # every layer
    manager.push_blocks(decoder_key, cache, [5], [0], range(1, 2), range(1, 2))  # layer 1 only
    conn.send("pushed")
    conn.recv()
    datadist.unlink_clusters([cluster_info(DECODER_CLUSTER_ID)], 5000, force=True)
    manager.deallocate_blocks_cache(cache)
    datadist.finalize()


def run_decoder(conn):
    datadist = init_datadist(LLMRole.DECODER, DECODER_CLUSTER_ID, free_port())
    manager = datadist.cache_manager
    cache = manager.allocate_blocks_cache(CacheDesc(2 * NUM_LAYERS, SHAPE, DataType.DT_FLOAT16),
                                          BlocksCacheKey(DECODER_CLUSTER_ID, 0))
    for tensor in cache.tensors:
        tensor.fill_(-1)
    link(datadist, PROMPT_CLUSTER_ID, conn.recv())  # the prompt's port
    conn.send("linked")
    conn.recv()  # pushed
    ok = True
    for index, tensor in enumerate(cache.tensors):
        want = torch.full_like(tensor, -1)
        for src, dst in zip(SRC_BLOCKS, DST_BLOCKS):
            want[dst] = index * 100 + src
        if index // 2 == 1:  # layer 1 (tensors 2, 3) also got block 5 into block 0
            want[0] = index * 100 + 5
        ok = ok and torch.equal(tensor, want)
    conn.send("checked")
    datadist.unlink_clusters([cluster_info(PROMPT_CLUSTER_ID)], 5000, force=True)
    manager.deallocate_blocks_cache(cache)
    datadist.finalize()
    report(f"push_blocks: blocks {SRC_BLOCKS} -> {DST_BLOCKS} (all layers) and 5 -> 0 (layer 1) "
           f"pushed into the decoder", ok)


def main():
    run_pair(run_prompt, run_decoder)


if __name__ == "__main__":
    main()
