"""The prefill process (LLMRole.PROMPT): runs the prompts and serves their KV blocks.

Its paged cache is registered under BlocksCacheKey(prefill cluster id, model 0), the way
vLLM-Ascend registers an engine's KV tensors; it listens on 127.0.0.1 so the decoder can link
and pull. The cache holds only `prefill_capacity` requests: before prefilling the next prompt
it waits until decode has pulled an earlier one and then reuses that request's blocks.
"""
from __future__ import annotations

import hashlib
import time
from typing import List, Tuple

from .. import BlocksCacheKey, LLMDataDist, LLMException, LLMRole
from ..control.host import free_port
from .channel import Channels, Handoff, recv
from .model import TinyDecoder, greedy, logits_bytes
from .paged_cache import PagedKVCache, blocks_for
from .workload import MODEL_ID, PREFILL_CLUSTER_ID, DemoConfig, datadist_options

LISTEN_IP = "127.0.0.1"
SYNC_KV_TIMEOUT_MS = 30_000


def prefill_request(model: TinyDecoder, cache: PagedKVCache, prompt: List[int],
                    block_table: List[int]) -> Tuple[int, str]:
    """Run one prompt into `block_table`; its first generated token and its logits' sha256."""
    logits = model.forward(prompt, 0, cache, block_table)
    return greedy(logits), hashlib.sha256(logits_bytes(logits)).hexdigest()


def _start_server(attempts: int = 5) -> Tuple[LLMDataDist, int]:
    """A listening PROMPT cluster on a free port (retried: the port may be taken meanwhile)."""
    for attempt in range(attempts):
        port = free_port(LISTEN_IP)
        datadist = LLMDataDist(LLMRole.PROMPT, PREFILL_CLUSTER_ID)
        try:
            datadist.init(datadist_options(SYNC_KV_TIMEOUT_MS, f"{LISTEN_IP}:{port}"))
            return datadist, port
        except LLMException:
            datadist.finalize()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def run_prefill(config: DemoConfig, prompts: List[List[int]], channels: Channels) -> None:
    deadline = time.monotonic() + config.timeout_s
    c = config.model
    model = TinyDecoder(c)
    cache = PagedKVCache(c.layers, config.prefill_blocks, c.block_size, c.kv_heads, c.head_dim)
    datadist, port = _start_server()
    try:
        datadist.cache_manager.register_blocks_cache(cache.cache_desc(), cache.addrs(),
                                                     BlocksCacheKey(PREFILL_CLUSTER_ID, MODEL_ID))
        channels.handoff.put(("hello", PREFILL_CLUSTER_ID, port))
        # Requests reach a system that is up: start once decode has linked, so that start-up
        # time does not count as time to first token.
        message = recv(channels.release, deadline, "decode to link")
        assert message == ("linked",), message

        held = {}                      # request id -> its blocks, until decode has pulled them
        state = {"bye": False, "waits": 0}

        def on_release(message) -> None:
            if message[0] == "pulled":
                cache.allocator.free(held.pop(message[1]))
            elif message[0] == "bye":
                state["bye"] = True

        compute_s = 0.0
        for request_id, prompt in enumerate(prompts):
            need = blocks_for(len(prompt), c.block_size)
            table = cache.allocator.allocate(need)
            while table is None:       # cache full: wait until decode pulled an earlier request
                state["waits"] += 1
                on_release(recv(channels.release, deadline, "decode to pull a request"))
                table = cache.allocator.allocate(need)
            start = time.perf_counter()
            first_token, digest = prefill_request(model, cache, prompt, table)
            compute_s += time.perf_counter() - start
            held[request_id] = table
            channels.handoff.put(("request", Handoff(request_id, len(prompt), table, first_token,
                                                     digest, time.monotonic())))

        # Keep serving until decode has pulled everything and unlinked.
        while held or not state["bye"]:
            on_release(recv(channels.release, deadline, "decode to pull every request"))
        channels.results.put(("result", "prefill", {
            "prompt_tokens": sum(len(p) for p in prompts),
            "compute_s": compute_s,
            "blocks": config.prefill_blocks,
            "peak_blocks_used": cache.allocator.peak_used,
            "blocks_reused": cache.allocator.reused,
            "waits_for_free_blocks": state["waits"],
        }))
    finally:
        datadist.finalize()
