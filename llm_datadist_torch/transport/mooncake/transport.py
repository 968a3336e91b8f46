"""`mooncake`: one-sided reads and writes of a peer's registered CPU memory through the Mooncake
Transfer Engine (TCP, or RDMA with `LLM_DATADIST_TORCH_MOONCAKE_PROTOCOL=rdma`); works across
hosts. Optional dependency; see `agent.py` for the engine, its set-up and its memory.

A transfer is one `batch_transfer_sync_read/write` with every segment (adjacent segments are
merged first; more than `MAX_PENDING_PER_PEER` segments go in several batches, see the
agent). Mooncake's synchronous calls only give up after their own timeout (at least 5 s,
plus a second per GiB), so the call runs in a thread of its own and the caller waits at most
until its deadline: then `LLM_TIMEOUT`, the link is marked broken (unlink and link again), and
the exception carries the call (`in_flight`) so that the caller keeps the local memory alive
until Mooncake has really let go of it. Mooncake reports failures as a bare -1 (peer gone or
unreachable, address refused by the peer): `LLM_LINK_FAILED`.

CPU memory only (the CPU wheel has no device registration): the requester reaches a peer's
device memory through the peer's host staging area and bounces its own through a host buffer
(`ops/remote_ops.py`, `transport/bounce.py`); device memory handed here anyway is refused with
`LLM_FEATURE_NOT_ENABLED` rather than given to Mooncake as a host address.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import List, Tuple

import torch

from ...status import LLMException, LLMStatusCode, fail
from ...core.descriptors import Region
from ..base import Peer, Segments, TransferItem, Transport

logger = logging.getLogger(__name__)


def coalesce(local: torch.Tensor, remote: torch.Tensor, lengths: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge runs of segments that are adjacent on both sides (vectorised); drop empty ones."""
    keep = lengths > 0
    if not bool(keep.all()):
        local, remote, lengths = local[keep], remote[keep], lengths[keep]
    if lengths.numel() < 2:
        return local, remote, lengths
    follows = ((local[:-1] + lengths[:-1] == local[1:])
               & (remote[:-1] + lengths[:-1] == remote[1:]))
    starts = torch.cat([torch.ones(1, dtype=torch.bool), ~follows])
    group = starts.cumsum(0) - 1
    merged = torch.zeros(int(group[-1]) + 1, dtype=torch.int64).index_add_(0, group, lengths)
    return local[starts], remote[starts], merged


class MooncakeTransport(Transport):
    """Moves bytes between local CPU tensors and a peer's Mooncake-registered CPU memory."""

    name = "mooncake"

    def __init__(self, peer: Peer):
        super().__init__(peer)
        self._timeouts = threading.local()  # the caller's timeout, for `_transfer`

    @classmethod
    def can_serve(cls, peer: Peer, region: Region) -> bool:
        # Both ends must run an agent (the handshake starts them when a link needs one).
        # Device regions are accepted here and refused in `_transfer`, with the reason.
        return bool(peer.mooncake_endpoint) and peer.mooncake_agent is not None

    def _checked_transfer(self, items: List[TransferItem], timeout_s, to_remote: bool) -> int:
        self._timeouts.value = timeout_s
        return super()._checked_transfer(items, timeout_s, to_remote)

    def _transfer(self, items: List[TransferItem], segments: Segments, to_remote: bool) -> None:
        timeout_s = getattr(self._timeouts, "value", None)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for item in items:
            if not item.lengths.numel():
                continue
            if item.region.device != "cpu" or item.local.device.type != "cpu":
                fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "mooncake moves CPU memory only (remote "
                     "%s, local %s): device memory needs a Mooncake build with device support or "
                     "staging through host memory, neither available here (%s)", item.region.device,
                     item.local.device, self.describe(item.region))
        remote, local = segments.addresses([item.region.address for item in items],
                                           [item.local.data_ptr() for item in items])
        local, remote, lengths = coalesce(local, remote, segments.lengths)
        if not lengths.numel():
            return
        agent = self.peer.mooncake_agent
        target = self.peer.mooncake_endpoint
        what = "%s of %d bytes in %d segment(s) with %s (peer pid %d)" % (
            "write" if to_remote else "read", int(lengths.sum()), lengths.numel(), target,
            self.peer.pid)
        call = agent.start_call(target, local.tolist(), remote.tolist(), lengths.tolist(), to_remote)
        wait_s = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not call.done.wait(wait_s):
            text = ("mooncake %s: no completion within %.3f s; the link is broken, unlink and "
                    "link again" % (what, timeout_s))
            logger.error("%s", text)
            call.abandon()  # batches not started yet will not start
            exc = LLMException(text, status_code=LLMStatusCode.LLM_TIMEOUT)
            exc.in_flight = call  # the caller keeps its memory until Mooncake lets go
            raise exc
        if call.error is not None:
            fail(LLMStatusCode.LLM_FAILED, "mooncake %s raised %r", what, call.error)
        if call.rc != 0:
            fail(LLMStatusCode.LLM_LINK_FAILED, "mooncake %s failed (rc %s): the peer is gone or "
                 "unreachable, or refused an address it no longer has registered", what, call.rc)
