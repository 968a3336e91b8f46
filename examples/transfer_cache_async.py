"""transfer_cache_async between two processes: the prompt pushes its KV layer by layer while
"the model" is still computing the later layers, straight into the decoder's paged cache.

The prompt's cache is contiguous (one request, 40 tokens); the decoder's is a blocks cache of
16-token blocks, so each layer's K and V are cut into blocks 4, 9 and 2 (the last one half
full). The decoder hands its cache addresses over out of band (here: the pipe).

Run: python examples/transfer_cache_async.py   (prints one line; exit code 1 if a byte differs)
"""
import threading

import torch

from llm_datadist_torch import (CacheDesc, DataType, LayerSynchronizer, LLMConfig, LLMDataDist,
                                LLMRole, LLMStatusCode, TransferConfig)
from _two_processes import free_port, link, report, run_pair

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 1, 2
NUM_LAYERS, TOKENS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, NUM_BLOCKS = 4, 40, 16, 8, 64, 12
DST_BLOCKS = [4, 9, 2]
BLOCK_BYTES = BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2  # float16


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


def layer_kv(layer, kv):
    """What "the model" writes into K (kv=0) or V (kv=1) of a layer: [tokens, heads, dim]."""
    generator = torch.Generator().manual_seed(layer * 2 + kv)
    return torch.randn(TOKENS, KV_HEADS, HEAD_DIM, generator=generator).to(torch.float16)


class LayerDone(LayerSynchronizer):
    """Lets layer L go once the model has set its event (a device event on an accelerator)."""

    def __init__(self, events):
        self.events = events

    def synchronize_layer(self, layer_index, timeout_in_millis):
        return self.events[layer_index].wait(30)


def run_prompt(conn):
    port = free_port()
    datadist = init_datadist(LLMRole.PROMPT, PROMPT_CLUSTER_ID, port)
    manager = datadist.cache_manager
    cache = manager.allocate_cache(CacheDesc(2 * NUM_LAYERS, [1, TOKENS, KV_HEADS, HEAD_DIM],
                                             DataType.DT_FLOAT16))
    conn.send(port)
    decoder_addrs = conn.recv()  # the decoder linked and sent its K0, V0, K1, V1, ... addresses
    events = [threading.Event() for _ in range(NUM_LAYERS)]
    task = manager.transfer_cache_async(
        cache, LayerDone(events), [TransferConfig(DECODER_CLUSTER_ID, decoder_addrs)],
        dst_block_indices=DST_BLOCKS, dst_block_memory_size=BLOCK_BYTES)
    for layer in range(NUM_LAYERS):  # the forward pass; each layer leaves as soon as it is done
        for kv in (0, 1):
            cache.tensors[2 * layer + kv][0].copy_(layer_kv(layer, kv))
        events[layer].set()
    status = task.synchronize()
    conn.send(int(status))
    conn.recv()  # the decoder has checked
    datadist.finalize()


def run_decoder(conn):
    datadist = init_datadist(LLMRole.DECODER, DECODER_CLUSTER_ID)
    manager = datadist.cache_manager
    cache = manager.allocate_blocks_cache(CacheDesc(2 * NUM_LAYERS, [NUM_BLOCKS, BLOCK_SIZE, KV_HEADS,
                                                                      HEAD_DIM], DataType.DT_FLOAT16))
    for tensor in cache.tensors:
        tensor.fill_(-1)
    cluster = link(datadist, PROMPT_CLUSTER_ID, conn.recv())  # the prompt's port
    conn.send(list(cache.tensor_addrs))
    status = LLMStatusCode(conn.recv())
    ok = status == LLMStatusCode.LLM_SUCCESS
    for index, tensor in enumerate(cache.tensors):
        want = torch.full_like(tensor, -1)
        tokens = layer_kv(index // 2, index % 2)
        for chunk, block in enumerate(DST_BLOCKS):
            part = tokens[chunk * BLOCK_SIZE:(chunk + 1) * BLOCK_SIZE]
            want[block][:len(part)] = part
        ok = ok and torch.equal(tensor, want)
    conn.send("checked")
    datadist.unlink_clusters([cluster], 5000)
    datadist.finalize()
    report(f"transfer_cache_async: {NUM_LAYERS} layers x {TOKENS} tokens pushed layer by layer "
           f"into decoder blocks {DST_BLOCKS} ({status.name})", ok)


def main():
    run_pair(run_prompt, run_decoder)


if __name__ == "__main__":
    main()
