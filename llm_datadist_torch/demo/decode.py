"""The decode process (LLMRole.DECODER): links with prefill, pulls each request's KV blocks into
its own paged cache, and generates greedily, round-robin over up to `max_batch` requests.

A request is admitted when decode has blocks for its whole length (prompt + new tokens); its
prompt blocks are pulled with pull_blocks, one call per layer range, then prefill is told it
may reuse them. Round-robin runs each request's step on its own (batch of one): the same shapes
as the single-process reference, hence the same kernels and the same bits.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from typing import List, Optional

from .. import (BlocksCacheKey, LLMClusterInfo, LLMDataDist, LLMRole, LLMStatusCode)
from .channel import Channels, Handoff, poll, recv
from .model import TinyDecoder, greedy, logits_bytes
from .paged_cache import PagedKVCache, blocks_for
from .workload import DECODE_CLUSTER_ID, MODEL_ID, DemoConfig, datadist_options

LOCAL_IP = "127.0.0.1"
LINK_TIMEOUT_MS = 10_000
SYNC_KV_TIMEOUT_MS = 30_000
PROGRESS_EVERY_S = 0.2


@dataclasses.dataclass
class Sequence:
    """A request being decoded: its tokens so far and where its KV lives in this cache."""
    request_id: int
    prompt_len: int
    blocks: List[int]
    tokens: List[int]                 # prefill's first token, then decode's
    prefill_digest: str
    digest: "hashlib._Hash" = dataclasses.field(default_factory=hashlib.sha256)
    ready_at: float = 0.0
    first_token_at: Optional[float] = None


def decode_step(model: TinyDecoder, cache: PagedKVCache, seq: Sequence) -> None:
    """Feed the last token (at position prompt_len + generated - 1), append the next one."""
    position = seq.prompt_len + len(seq.tokens) - 1
    logits = model.forward([seq.tokens[-1]], position, cache, seq.blocks)
    seq.digest.update(logits_bytes(logits))
    seq.tokens.append(greedy(logits))


def output_of(seq: Sequence) -> dict:
    return {"tokens": seq.tokens, "prefill_digest": seq.prefill_digest,
            "decode_digest": seq.digest.hexdigest()}


def _link(datadist: LLMDataDist, cluster_id: int, port: int, unlink: bool = False) -> None:
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = cluster_id
    cluster.append_local_ip_info(LOCAL_IP, 0)
    cluster.append_remote_ip_info(LOCAL_IP, port)
    call = datadist.unlink_clusters if unlink else datadist.link_clusters
    overall, per_cluster = call([cluster], LINK_TIMEOUT_MS)
    if overall != LLMStatusCode.LLM_SUCCESS or list(per_cluster) != [LLMStatusCode.LLM_SUCCESS]:
        raise RuntimeError(f"{call.__name__} with 127.0.0.1:{port} failed: {overall!r} {per_cluster!r}")


class Decoder:
    def __init__(self, config: DemoConfig, channels: Channels, datadist: LLMDataDist):
        c = config.model
        self.config, self.channels, self.datadist = config, channels, datadist
        self.model = TinyDecoder(c)
        self.cache = PagedKVCache(c.layers, config.decode_blocks, c.block_size, c.kv_heads, c.head_dim)
        self.manager = datadist.cache_manager
        # No key of its own: nobody pulls from decode (vLLM-Ascend's D side may pass None).
        self.handle = self.manager.register_blocks_cache(self.cache.cache_desc(), self.cache.addrs(), None)
        self.stats = collections.Counter()
        self.ttft: List[float] = []
        self.outputs = {}

    def pull(self, src_key: BlocksCacheKey, handoff: Handoff, dst_blocks: List[int]) -> None:
        """The request's prompt blocks, one pull_blocks call per layer range."""
        src_blocks = handoff.blocks
        for layers in self.config.layer_ranges:
            start = time.perf_counter()
            self.manager.pull_blocks(src_key, self.handle, src_blocks=src_blocks, dst_blocks=dst_blocks,
                                     src_layer_range=layers, dst_layer_range=layers)
            self.stats["pull_s"] += time.perf_counter() - start
            self.stats["pull_calls"] += 1
        self.stats["kv_bytes"] += len(src_blocks) * self.cache.block_bytes
        if self.config.corrupt_block and handoff.request_id == 0:
            self.cache.zero_block(dst_blocks[0])    # test hook: the demo must notice

    def run(self) -> dict:
        config, channels = self.config, self.channels
        deadline = time.monotonic() + config.timeout_s
        _, prefill_id, port = recv(channels.handoff, deadline, "prefill to start listening")
        start = time.perf_counter()
        _link(self.datadist, prefill_id, port)
        link_ms = (time.perf_counter() - start) * 1e3
        channels.release.put(("linked",))
        src_key = BlocksCacheKey(prefill_id, MODEL_ID)

        waiting = collections.deque()
        active: List[Sequence] = []
        pulled = 0
        last_progress = 0.0
        started = None
        while len(self.outputs) < config.requests:
            # Take what prefill handed off; block for it only when there is nothing to run.
            message = poll(channels.handoff) if active or waiting else \
                recv(channels.handoff, deadline, "a request from prefill")
            while message is not None:
                waiting.append(message[1])
                message = poll(channels.handoff)

            # Admit while there is room for a request's whole length.
            while waiting and len(active) < config.max_batch:
                handoff = waiting[0]
                blocks = self.cache.allocator.allocate(
                    blocks_for(handoff.prompt_len + config.new_tokens, config.model.block_size))
                if blocks is None:
                    break
                waiting.popleft()
                started = started or time.perf_counter()
                self.pull(src_key, handoff, blocks[:len(handoff.blocks)])
                channels.release.put(("pulled", handoff.request_id))   # prefill reuses them
                active.append(Sequence(handoff.request_id, handoff.prompt_len, blocks,
                                       [handoff.first_token], handoff.prefill_digest,
                                       ready_at=handoff.ready_at))
                pulled += 1
                if pulled == config.requests:       # all KV is here: the link can go
                    _link(self.datadist, prefill_id, port, unlink=True)
                    channels.release.put(("bye",))

            # One round-robin pass: one token for every active request.
            for seq in list(active):
                decode_step(self.model, self.cache, seq)
                self.stats["decode_tokens"] += 1
                if seq.first_token_at is None:
                    seq.first_token_at = time.monotonic()
                    self.ttft.append(seq.first_token_at - seq.ready_at)
                if len(seq.tokens) == 1 + config.new_tokens:
                    active.remove(seq)
                    self.cache.allocator.free(seq.blocks)
                    self.outputs[seq.request_id] = output_of(seq)

            now = time.monotonic()
            if now - last_progress > PROGRESS_EVERY_S or len(self.outputs) == config.requests:
                last_progress = now
                channels.results.put(("progress", len(self.outputs), self.stats["decode_tokens"]))
            if now > deadline:
                raise TimeoutError(f"decode did not finish within {config.timeout_s} s")

        return {"outputs": self.outputs, "ttft_s": self.ttft, "link_ms": link_ms,
                "decode_s": time.perf_counter() - started,
                "blocks": config.decode_blocks, "peak_blocks_used": self.cache.allocator.peak_used,
                "blocks_reused": self.cache.allocator.reused, **self.stats}


def run_decode(config: DemoConfig, channels: Channels) -> None:
    datadist = LLMDataDist(LLMRole.DECODER, DECODE_CLUSTER_ID)
    datadist.init(datadist_options(SYNC_KV_TIMEOUT_MS))
    try:
        channels.results.put(("result", "decode", Decoder(config, channels, datadist).run()))
    finally:
        datadist.finalize()
