"""switch_role between two processes: A starts as the prompt, B as the decoder; B pulls from A,
they unlink and swap roles (the listener moves from A to B), A links to B and B pushes KV
blocks into A, one tensor per "layer" as in the upstream sample.

Run: python examples/switch_role.py   (prints one line; exit code 1 if a byte differs)
"""
import torch

from llm_datadist_torch import BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMRole
from _two_processes import cluster_info, free_port, link, report, run_pair

A_CLUSTER_ID, B_CLUSTER_ID = 1, 2
NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 8, 16, 8, 64
SHAPE = [NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM]


def start(role, cluster_id, fill, listen_port=None):
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    config.enable_remote_cache_accessible = True
    config.enable_switch_role = True
    config.mem_pool_cfg = '{"memory_size": 67108864}'
    if listen_port is not None:
        config.listen_ip_info = f"127.0.0.1:{listen_port}"
    datadist = LLMDataDist(role, cluster_id)
    datadist.init(config.generate_options())
    cache = datadist.cache_manager.allocate_blocks_cache(
        CacheDesc(2, SHAPE, DataType.DT_FLOAT16), BlocksCacheKey(cluster_id, 0))  # one K, one V
    for index, tensor in enumerate(cache.tensors):
        for block in range(NUM_BLOCKS):
            tensor[block] = fill(index, block)
    return datadist, cache


def run_a(conn):
    port = free_port()
    datadist, cache = start(LLMRole.PROMPT, A_CLUSTER_ID, lambda i, b: 100 + 10 * i + b, port)
    conn.send(port)
    conn.recv()                                   # B pulled and unlinked
    datadist.switch_role(LLMRole.DECODER)         # stop listening
    conn.send("switched")
    b_cluster = link(datadist, B_CLUSTER_ID, conn.recv())  # B listens now
    conn.send("linked")
    conn.recv()                                   # B pushed
    ok = True
    for i, tensor in enumerate(cache.tensors):
        want = torch.empty_like(tensor)
        for block in range(NUM_BLOCKS):
            want[block] = 100 + 10 * i + block
        want[3] = 200 + 10 * i + 1                # B's block 1 pushed into block 3
        ok = ok and torch.equal(tensor, want)
    datadist.unlink_clusters([b_cluster], 5000)
    datadist.cache_manager.deallocate_blocks_cache(cache)
    datadist.finalize()
    conn.send(ok)


def run_b(conn):
    datadist, cache = start(LLMRole.DECODER, B_CLUSTER_ID, lambda i, b: 200 + 10 * i + b)
    a_cluster = link(datadist, A_CLUSTER_ID, conn.recv())  # A listens
    datadist.cache_manager.pull_blocks(BlocksCacheKey(A_CLUSTER_ID, 0), cache, [0, 1], [6, 7])
    pulled_ok = all(float(t[6, 0, 0, 0]) == 100 + 10 * i and float(t[7, 0, 0, 0]) == 101 + 10 * i
                    for i, t in enumerate(cache.tensors))
    datadist.unlink_clusters([a_cluster], 5000)   # tells A as well
    conn.send("unlinked")
    conn.recv()                                   # A is a decoder now
    port = free_port()
    datadist.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": f"127.0.0.1:{port}"})
    conn.send(port)
    conn.recv()                                   # A linked to us
    datadist.cache_manager.push_blocks(BlocksCacheKey(A_CLUSTER_ID, 0), cache, [1], [3],
                                       src_layer_range=range(0, 2), dst_layer_range=range(0, 2),
                                       tensor_num_per_layer=1)
    conn.send("pushed")
    pushed_ok = conn.recv()
    datadist.unlink_clusters([cluster_info(A_CLUSTER_ID)], 5000, force=True)
    datadist.cache_manager.deallocate_blocks_cache(cache)
    datadist.finalize()
    report("switch_role: B pulled from A (prompt), roles swapped, B (now prompt) pushed into A",
           pulled_ok and pushed_ok)


def main():
    run_pair(run_a, run_b)


if __name__ == "__main__":
    main()
