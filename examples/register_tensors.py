"""Engine-owned KV tensors, registered and pulled block by block: the path upstream recommends.

Each side allocates its paged KV cache itself with torch (one K and one V blocks tensor per
layer) and registers the tensors with `register_blocks_cache`; the decoder links to the prompt
side and pulls blocks with `pull_blocks`. Both clusters run in this one process to keep the
example short (the bytes then move through the `local` transport); examples/pull_blocks.py does
the same between two processes over link(), and `python -m llm_datadist_torch.demo` serves a
model that way.

Run: python examples/register_tensors.py   (prints one line; exit code 1 if a byte differs)
"""
import os
import sys

import torch

from llm_datadist_torch import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,
                                LLMDataDist, LLMRole, LLMStatusCode)
from _two_processes import free_port

PROMPT_ID, DECODER_ID = 1, 2                      # cluster ids
LAYERS, SHAPE = 4, [64, 16, 8, 64]                # blocks, block size, KV heads, head dim
SRC_BLOCKS, DST_BLOCKS = [0, 1, 2, 7], [4, 5, 6, 3]
# The engine's device must be the one the library puts Placement.DEVICE caches on (README,
# "Device policy"): NPU with torch_npu, else CUDA, else CPU, unless LLM_DATADIST_TORCH_DEVICE says.
DEVICE = os.environ.get("LLM_DATADIST_TORCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def start(role, cluster_id, listen_ip_info=None):
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    if listen_ip_info is not None:
        config.listen_ip_info = listen_ip_info    # this side serves: peers link to it
    datadist = LLMDataDist(role, cluster_id)
    datadist.init(config.generate_options())
    return datadist


def engine_kv_cache():
    """What an engine allocates: K0, V0, K1, V1, ..., each [blocks, block size, heads, dim].
    The tensors must stay alive while they are registered."""
    return [torch.zeros(SHAPE, dtype=torch.float16, device=DEVICE) for _ in range(2 * LAYERS)]


def main():
    port = free_port()
    prompt = start(LLMRole.PROMPT, PROMPT_ID, f"127.0.0.1:{port}")
    decoder = start(LLMRole.DECODER, DECODER_ID)
    try:
        desc = CacheDesc(2 * LAYERS, SHAPE, DataType.DT_FLOAT16)   # Placement.DEVICE
        prompt_kv = engine_kv_cache()
        prompt.cache_manager.register_blocks_cache(desc, [t.data_ptr() for t in prompt_kv],
                                                   BlocksCacheKey(PROMPT_ID, model_id=0))
        decoder_kv = engine_kv_cache()
        decoder_cache = decoder.cache_manager.register_blocks_cache(
            desc, [t.data_ptr() for t in decoder_kv])                # no key: nobody pulls it
        for tensor in prompt_kv:
            tensor.normal_()                                         # prefill writes its KV

        cluster = LLMClusterInfo()
        cluster.remote_cluster_id = PROMPT_ID
        cluster.append_local_ip_info("127.0.0.1", 0)
        cluster.append_remote_ip_info("127.0.0.1", port)
        status, _ = decoder.link_clusters([cluster], timeout=3000)
        assert status == LLMStatusCode.LLM_SUCCESS, status

        # Blocks 0, 1, 2, 7 of every prompt tensor -> blocks 4, 5, 6, 3 of the decoder's.
        decoder.cache_manager.pull_blocks(BlocksCacheKey(PROMPT_ID, model_id=0), decoder_cache,
                                          src_blocks=SRC_BLOCKS, dst_blocks=DST_BLOCKS)

        ok = True
        for src, dst in zip(prompt_kv, decoder_kv):
            want = torch.zeros_like(dst)
            want[DST_BLOCKS] = src[SRC_BLOCKS]
            ok = ok and torch.equal(dst, want)
        decoder.unlink_clusters([cluster], timeout=3000)
    finally:
        decoder.finalize()
        prompt.finalize()
    print(f"register_blocks_cache + pull_blocks: blocks {SRC_BLOCKS} -> {DST_BLOCKS} of "
          f"{2 * LAYERS} engine tensors {SHAPE} on {DEVICE}, "
          f"{'all bytes match' if ok else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
