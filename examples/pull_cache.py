"""pull_cache between two processes: the prompt allocates a KV cache with one request key per
batch slot, the decoder links to it and pulls every request into its own cache.

Run: python examples/pull_cache.py   (prints one line; exit code 1 if a byte differs)
"""
import torch

from llm_datadist_torch import CacheDesc, CacheKey, DataType, LLMConfig, LLMDataDist, LLMRole
from _two_processes import free_port, link, report, run_pair

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 1, 2
NUM_LAYERS, BATCH, SEQ_LEN, HIDDEN = 4, 4, 128, 256
SHAPE = [BATCH, SEQ_LEN, HIDDEN]  # batch (one request per slot) is dim 0


def init_datadist(role, cluster_id, listen_port=None):
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    config.mem_pool_cfg = '{"memory_size": 67108864}'
    if listen_port is not None:
        config.listen_ip_info = f"127.0.0.1:{listen_port}"
    datadist = LLMDataDist(role, cluster_id)
    datadist.init(config.generate_options())
    return datadist


def request_kv(req_id, tensor_index, device):
    """What request `req_id` holds in cache tensor `tensor_index` (K0, V0, K1, V1, ...)."""
    return torch.full(SHAPE[1:], req_id * 100 + tensor_index, dtype=torch.float16, device=device)


def run_prompt(conn):
    port = free_port()
    datadist = init_datadist(LLMRole.PROMPT, PROMPT_CLUSTER_ID, listen_port=port)
    manager = datadist.cache_manager
    keys = [CacheKey(prompt_cluster_id=PROMPT_CLUSTER_ID, req_id=i, model_id=0) for i in range(BATCH)]
    cache = manager.allocate_cache(CacheDesc(2 * NUM_LAYERS, SHAPE, DataType.DT_FLOAT16), keys)
    for index, tensor in enumerate(cache.tensors):
        for req_id in range(BATCH):
            tensor[req_id] = request_kv(req_id, index, tensor.device)
    conn.send(port)               # ready: the decoder may link and pull
    conn.recv()                   # the decoder is done
    for key in keys:
        manager.remove_cache_key(key)  # no-op for keys already consumed by a pull
    manager.deallocate_cache(cache)
    datadist.finalize()


def run_decoder(conn):
    datadist = init_datadist(LLMRole.DECODER, DECODER_CLUSTER_ID)
    manager = datadist.cache_manager
    cache = manager.allocate_cache(CacheDesc(2 * NUM_LAYERS, SHAPE, DataType.DT_FLOAT16))
    cluster = link(datadist, PROMPT_CLUSTER_ID, conn.recv())  # the prompt's port
    order = list(reversed(range(BATCH)))  # request i lands in slot BATCH-1-i
    for slot, req_id in enumerate(order):
        manager.pull_cache(CacheKey(prompt_cluster_id=PROMPT_CLUSTER_ID, req_id=req_id), cache,
                           batch_index=slot)
    ok = all(torch.equal(tensor[slot], request_kv(req_id, index, tensor.device))
             for index, tensor in enumerate(cache.tensors) for slot, req_id in enumerate(order))
    datadist.unlink_clusters([cluster], 5000)
    conn.send("done")
    manager.deallocate_cache(cache)
    datadist.finalize()
    report(f"pull_cache: {BATCH} requests x {2 * NUM_LAYERS} tensors of {SHAPE[1:]} pulled", ok)


def main():
    run_pair(run_prompt, run_decoder)


if __name__ == "__main__":
    main()
