"""Prepared transfers: everything about a pair of caches that does not change between calls,
worked out once, so that a call is one native call whatever the number of tensors.

A link prepares a transfer when it first moves bytes between one of the owner's caches (as the
owner described it: its fence value) and one local cache, for one set of tensor pairs. It holds
the region of every remote tensor where the native copies reach it (a mapping of the owner's
file, or an address in the owner for CMA), every local tensor's region, and where the owner's
fence word is read. A call then hands the plan's offsets to `_C.PreparedCopy.run`, which checks
every segment against those regions, reads the fence word, moves the bytes and reads the word
again (a seqlock) with the GIL released.

Only transports that reach CPU memory by address prepare (`Transport.native_bases`: local,
shm, cma); other moves (device memory, Mooncake, staging) go through transfer items.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from .. import faults
from ..core.descriptors import Fence, Region
from ..memory.copy import COPY_THREADS, SegmentRangeError, refuse
from ..memory.native import _C
from ..status import LLMStatusCode, fail
from .base import WORD_BYTES, Transport

class PreparedTransfer:
    """Moves the same segments between fixed pairs of (remote region, local tensor)."""

    def __init__(self, transport: Transport, regions: Sequence[Region],
                 fence_transport: Transport, copy: "_C.PreparedCopy", data_pid: int):
        self.transport = transport
        self.fence_transport = fence_transport
        self._regions = list(regions)
        self._copy = copy
        # Which transport's process an OSError (a failed CMA call) is about.
        self._syscalls = transport if data_pid else fence_transport

    @classmethod
    def prepare(cls, transport: Transport, regions: Sequence[Region],
                local: Sequence[torch.Tensor], fence_transport: Transport, fence_region: Region,
                fence: Fence) -> Optional["PreparedTransfer"]:
        """The prepared transfer of remote `regions[i]` <-> `local[i]`, or None where these
        transports or tensors do not allow one (memory not reached by address). Call between
        `enter()` and `leave()` of both transports, with the local cache pinned."""
        if any(not tensor.is_cpu for tensor in local):
            return None
        data = transport.native_bases(regions)
        word = fence_transport.native_bases([fence_region])
        if data is None or word is None:
            return None
        (data_pid, bases), (fence_pid, (fence_base,)) = data, word
        # The word is read atomically: it must be whole inside the table and 8-byte aligned.
        if (not 0 <= fence.offset <= fence_region.nbytes - WORD_BYTES
                or (fence_base + fence.offset) % WORD_BYTES):
            fail(LLMStatusCode.LLM_PARAM_INVALID, "fence word at %d is not an aligned word "
                 "inside %s", fence.offset, fence_transport.describe(fence_region))
        copy = _C.PreparedCopy(
            data_pid, [v for base, region in zip(bases, regions) for v in (base, region.nbytes)],
            [v for tensor in local for v in (tensor.data_ptr(), tensor.nbytes)],
            fence_pid, fence_base + fence.offset, fence.value)
        return cls(transport, regions, fence_transport, copy, data_pid)

    def run(self, remote_offsets: Sequence[int], local_offsets: Sequence[int],
            lengths: Sequence[int], to_remote: bool, deadline: float) -> int:
        """Move the segments (one native call); returns the bytes moved, or a negative
        `_C.FENCE_MOVED_BEFORE` / `_C.FENCE_MOVED_AFTER` when the owner's fence word changed
        (the bytes must not be used)."""
        transport, fence_transport = self.transport, self.fence_transport
        transport.enter()
        try:
            if fence_transport is transport:
                return self._run(remote_offsets, local_offsets, lengths, to_remote, deadline)
            fence_transport.enter()
            try:
                return self._run(remote_offsets, local_offsets, lengths, to_remote, deadline)
            finally:
                fence_transport.leave()
        finally:
            transport.leave()

    def _run(self, remote_offsets, local_offsets, lengths, to_remote: bool,
             deadline: float) -> int:
        if deadline <= time.monotonic():
            fail(LLMStatusCode.LLM_TIMEOUT, "%s %s with peer pid %d: deadline passed before "
                 "the copy started", self.transport.name, "write" if to_remote else "read",
                 self.transport.peer.pid)
        faults.before_copy(self.transport.name)
        try:
            return self._copy.run(remote_offsets, local_offsets, lengths, to_remote, COPY_THREADS)
        except SegmentRangeError as exc:
            refuse(exc, [len(lengths)] * len(self._regions), "tensor pair",
                   where=lambda i: self.transport.describe(self._regions[i]))
        except OSError as exc:
            self._syscalls.raise_os_error(exc, "%s of %d tensor(s), first %s" % (
                "write" if to_remote else "read", len(self._regions),
                self.transport.describe(self._regions[0])))
