"""pull_blocks between two processes over a two-sided link() (the vllm-ascend pattern).

Each side owns its paged KV cache as plain torch tensors (K and V per layer, block = dim 0)
and registers their addresses; both call link() with the same rank table, poll
query_register_mem_status until OK, then the decoder pulls the prompt's blocks.
On CPU the rank table's "device_ip" + "device_port" say where each rank listens.

Run: python examples/pull_blocks.py   (prints one line; exit code 1 if a byte differs)
"""
import json
import time

import torch

from llm_datadist_torch import (BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist,
                                LLMRole, RegisterMemStatus)
from _two_processes import free_port, report, run_pair

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 1, 2
NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 32, 16, 8, 64
SHAPE = [NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM]
SRC_BLOCKS, DST_BLOCKS = [0, 1, 2, 7], [4, 5, 6, 3]


def init_datadist(role, cluster_id):
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    datadist = LLMDataDist(role, cluster_id)
    datadist.init(config.generate_options())
    return datadist


def make_kv_caches(fill):
    """The engine's own cache: (K, V) per layer, registered as one cache of 2 * layers tensors.
    Block b of tensor i holds fill(i, b)."""
    kv = [torch.empty(SHAPE, dtype=torch.float16) for _ in range(2 * NUM_LAYERS)]
    for i, tensor in enumerate(kv):
        for block in range(NUM_BLOCKS):
            tensor[block] = fill(i, block)
    return kv, CacheDesc(len(kv), SHAPE, DataType.DT_FLOAT16)


def link_and_wait(datadist, rank_table):
    comm_id = datadist.link("pd_comm", {PROMPT_CLUSTER_ID: 0, DECODER_CLUSTER_ID: 1}, rank_table)
    deadline = time.monotonic() + 30
    while datadist.query_register_mem_status(comm_id) != RegisterMemStatus.OK:
        if time.monotonic() > deadline:
            raise RuntimeError("link did not become ready")
        time.sleep(0.01)
    return comm_id


def run_prompt(conn, rank_table):
    datadist = init_datadist(LLMRole.PROMPT, PROMPT_CLUSTER_ID)
    kv, desc = make_kv_caches(lambda i, block: i * 100 + block)
    cache = datadist.cache_manager.register_blocks_cache(
        desc, [t.data_ptr() for t in kv], BlocksCacheKey(PROMPT_CLUSTER_ID, 0))
    comm_id = link_and_wait(datadist, rank_table)
    conn.recv()  # the decoder has pulled
    datadist.unlink(comm_id)
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def run_decoder(conn, rank_table):
    datadist = init_datadist(LLMRole.DECODER, DECODER_CLUSTER_ID)
    kv, desc = make_kv_caches(lambda i, block: -1)
    cache = datadist.cache_manager.register_blocks_cache(desc, [t.data_ptr() for t in kv])
    comm_id = link_and_wait(datadist, rank_table)
    datadist.cache_manager.pull_blocks(BlocksCacheKey(PROMPT_CLUSTER_ID, 0), cache,
                                       SRC_BLOCKS, DST_BLOCKS)
    ok = True
    for i, tensor in enumerate(kv):
        want = torch.full_like(tensor, -1)
        for src, dst in zip(SRC_BLOCKS, DST_BLOCKS):
            want[dst] = i * 100 + src
        ok = ok and torch.equal(tensor, want)
    conn.send("done")
    datadist.unlink(comm_id)
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    report(f"pull_blocks: blocks {SRC_BLOCKS} -> {DST_BLOCKS} of {2 * NUM_LAYERS} tensors "
           f"{SHAPE} over link()", ok)


def main():
    devices = [{"device_id": str(rank), "device_ip": "127.0.0.1", "device_port": free_port(),
                "rank_id": str(rank)} for rank in range(2)]
    rank_table = json.dumps({"version": "1.2", "status": "completed", "server_count": "1",
                             "server_list": [{"server_id": "127.0.0.1", "device": devices}]})
    run_pair(run_prompt, run_decoder, rank_table)


if __name__ == "__main__":
    main()
