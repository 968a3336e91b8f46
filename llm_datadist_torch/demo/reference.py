"""The single-process run the disaggregated one must equal: same model, same prompts, prefill
and decode into one paged cache, nothing transferred."""
from __future__ import annotations

from typing import Dict, List

from .decode import Sequence, decode_step, output_of
from .model import TinyDecoder
from .paged_cache import PagedKVCache, blocks_for
from .prefill import prefill_request
from .workload import DemoConfig


def run_reference(config: DemoConfig, prompts: List[List[int]]) -> Dict[int, dict]:
    c = config.model
    model = TinyDecoder(c)
    need = max(blocks_for(len(p) + config.new_tokens, c.block_size) for p in prompts)
    cache = PagedKVCache(c.layers, need, c.block_size, c.kv_heads, c.head_dim)
    outputs = {}
    for request_id, prompt in enumerate(prompts):
        blocks = cache.allocator.allocate(blocks_for(len(prompt) + config.new_tokens, c.block_size))
        first_token, digest = prefill_request(model, cache, prompt, blocks)
        seq = Sequence(request_id, len(prompt), blocks, [first_token], digest)
        for _ in range(config.new_tokens):
            decode_step(model, cache, seq)
        cache.allocator.free(blocks)
        outputs[request_id] = output_of(seq)
    return outputs
