"""The demo's own side channel between the processes: who holds which blocks, never the KV.

Three multiprocessing queues, each written by one side:
  handoff  prefill -> decode   ("hello", cluster_id, port), ("request", Handoff)
  release  decode  -> prefill  ("linked",); ("pulled", request_id): prefill may reuse those
                               blocks; ("bye",): decode has unlinked, prefill may finish
  results  child   -> parent   ("progress", ...), ("result", name, dict), ("error", name, traceback)
"""
from __future__ import annotations

import dataclasses
import queue
import time
from typing import List


@dataclasses.dataclass
class Handoff:
    """A request whose prompt KV sits in prefill's cache, ready to be pulled."""
    request_id: int
    prompt_len: int
    blocks: List[int]          # prefill's block table for the prompt
    first_token: int           # prefill's greedy token (from the last prompt position)
    prefill_digest: str        # sha256 of prefill's logits, for the bit-exactness check
    ready_at: float            # time.monotonic() when the KV was complete (system-wide clock)


class Channels:
    def __init__(self, ctx):
        self.handoff = ctx.Queue()
        self.release = ctx.Queue()
        self.results = ctx.Queue()

    def all(self):
        return (self.handoff, self.release, self.results)


def recv(q, deadline: float, waiting_for: str):
    """The next message, or TimeoutError naming what never came (every wait is bounded)."""
    try:
        return q.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise TimeoutError(f"timed out waiting for {waiting_for}") from None


def poll(q):
    """The next message if one is there, else None."""
    try:
        return q.get_nowait()
    except queue.Empty:
        return None
