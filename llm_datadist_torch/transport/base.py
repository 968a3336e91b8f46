"""The data-plane interface: move byte segments between local and remote cache tensors.

The manager reduces every transfer, once and vectorised, to a list of `TransferItem`s (segments
between one remote tensor and one local raw tensor); a `Transport` checks all of them and then
moves the bytes in as few native calls as it can.

Timeouts: every backend here is a synchronous memcpy or syscall that cannot be interrupted,
so `timeout_s` is checked once, before any byte moves: a deadline already passed
(`timeout_s <= 0`) fails with `LLM_TIMEOUT`; `None` means no limit. A copy that overruns a
positive timeout completes and is logged, not failed: its bytes are already in place.
`mooncake` is the exception: a network transfer can stall, so it stops waiting at the deadline
(see mooncake.py).
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import threading
import time
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..memory.native import _C
from ..memory.copy import SegmentBatch, copy_addresses, copy_batches
from ..core.descriptors import Region
from ..status import LLMStatusCode, fail

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Peer:
    """The process on the other end of a link."""

    pid: int
    same_process: bool
    same_host: bool
    mooncake_endpoint: str = ""  # the peer's Mooncake "ip:rpc_port" ("" when it runs none)
    # This side's Mooncake agent (`transport.mooncake.agent.MooncakeAgent`) that reaches the peer.
    mooncake_agent: Optional[object] = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass
class TransferItem:
    """Segments `remote[remote_offsets[i]:+lengths[i]] <-> local[local_offsets[i]:+lengths[i]]`."""

    region: Region
    remote_offsets: torch.Tensor  # int64 CPU, byte offsets inside the remote tensor
    local: torch.Tensor           # local raw 1-D uint8 tensor (CPU or device)
    local_offsets: torch.Tensor   # int64 CPU
    lengths: torch.Tensor         # int64 CPU


@dataclasses.dataclass
class Segments:
    """All segments of a list of items, concatenated; `counts[i]` belong to item i."""

    counts: torch.Tensor
    remote_offsets: torch.Tensor
    local_offsets: torch.Tensor
    lengths: torch.Tensor

    @property
    def total_bytes(self) -> int:
        return int(self.lengths.sum()) if self.lengths.numel() else 0

    def addresses(self, remote_bases: Sequence[int], local_bases: Sequence[int]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Absolute (remote, local) addresses: per-item base + offset, vectorised."""
        # numpy, not repeat_interleave: that is a parallel torch kernel, whose idle OpenMP worker
        # then spins for milliseconds on the core the copy threads need (see memory/copy.py, ascending).
        def expand(bases):
            return torch.from_numpy(np.repeat(np.array(bases, dtype=np.int64),
                                              self.counts.numpy()))
        return (expand(remote_bases) + self.remote_offsets,
                expand(local_bases) + self.local_offsets)


def _describe(peer: Peer, region: Region) -> str:
    where = f"{region.device} 0x{region.address:x} ({region.nbytes} bytes"
    if region.shm_name:
        where += f", /dev/shm/{region.shm_name}+{region.shm_offset}"
    return f"peer pid {peer.pid}, region {where})"


def check_items(peer: Peer, items: Sequence[TransferItem]) -> Segments:
    """Validate every item and segment before any memory is touched -> `LLM_PARAM_INVALID`.

    Each segment must lie in `[0, region.nbytes)` and inside `local`. Items usually share one
    plan (the same offset and length tensors for every cache tensor), so the extent of each
    distinct offsets/lengths pair is computed once and compared with every item's limits.
    """
    extents: Dict[Tuple[int, int], Optional[Tuple[int, int, int]]] = {}
    for index, item in enumerate(items):
        _check_item_shapes(peer, item)
        for side, offsets, limit in (("remote", item.remote_offsets, item.region.nbytes),
                                     ("local", item.local_offsets, item.local.numel())):
            key = (id(offsets), id(item.lengths))
            if key not in extents:
                extents[key] = _extent(offsets, item.lengths)
            extent = extents[key]
            if extent is not None and (extent[0] < 0 or extent[1] < 0 or extent[2] > limit):
                fail(LLMStatusCode.LLM_PARAM_INVALID,
                     "%s segments of item %d reach [%d, %d) with lengths >= %d, outside its %s "
                     "tensor of %d bytes (%s)", side, index, extent[0], extent[2], extent[1], side,
                     limit, _describe(peer, item.region))
    empty = torch.empty(0, dtype=torch.int64)
    if not items:
        return Segments(empty, empty, empty, empty)
    return Segments(torch.tensor([item.lengths.numel() for item in items], dtype=torch.int64),
                    torch.cat([item.remote_offsets for item in items]),
                    torch.cat([item.local_offsets for item in items]),
                    torch.cat([item.lengths for item in items]))


def _extent(offsets: torch.Tensor, lengths: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """(smallest offset, smallest length, largest end) of the segments; None if there are none.

    Offsets and lengths above 2**62 are reported as the end itself, so `offset + length`
    cannot overflow int64.
    """
    if not lengths.numel():
        return None
    huge = 2**62
    max_offset, max_length = int(offsets.max()), int(lengths.max())
    if max_offset > huge or max_length > huge:
        return int(offsets.min()), int(lengths.min()), max(max_offset, max_length)
    return int(offsets.min()), int(lengths.min()), int((offsets + lengths).max())


def _check_item_shapes(peer: Peer, item: TransferItem) -> None:
    local = item.local
    if local.dtype != torch.uint8 or local.dim() != 1 or not local.is_contiguous():
        fail(LLMStatusCode.LLM_PARAM_INVALID,
             "local tensor must be a contiguous 1-D uint8 tensor, got %s %s (%s)",
             local.dtype, tuple(local.shape), _describe(peer, item.region))
    n = item.lengths.numel()
    for name in ("remote_offsets", "local_offsets", "lengths"):
        t = getattr(item, name)
        if t.dtype != torch.int64 or t.device.type != "cpu" or t.dim() != 1 or t.numel() != n:
            fail(LLMStatusCode.LLM_PARAM_INVALID,
                 "%s must be a 1-D int64 CPU tensor of %d entries, got %s %s on %s (%s)",
                 name, n, t.dtype, tuple(t.shape), t.device, _describe(peer, item.region))
    if item.region.nbytes < 0:
        fail(LLMStatusCode.LLM_PARAM_INVALID, "negative region size (%s)",
             _describe(peer, item.region))


class Transport(abc.ABC):
    """Reads and writes segments of one peer's memory; one instance per link and backend.

    `read`/`write` validate everything, then call `_transfer` once. Subclasses implement
    `can_serve` (a declared capability, never a trial copy), `_transfer`, and `_release`.
    Methods may be called from several threads; `close()` waits for copies in flight.
    """

    name: ClassVar[str]
    # Whether `_transfer` copies to and from local accelerator memory itself; if not, the
    # caller bounces such memory through host memory (transport/bounce.py).
    moves_local_device_memory: ClassVar[bool] = False

    def __init__(self, peer: Peer):
        self.peer = peer
        self._closed = False
        self._cond = threading.Condition()
        self._active = 0  # copies in flight; close() must not unmap under them

    @classmethod
    @abc.abstractmethod
    def can_serve(cls, peer: Peer, region: Region) -> bool:
        """Whether this backend can move bytes of `region` owned by `peer`."""

    def read(self, items: Sequence[TransferItem], timeout_s: Optional[float]) -> int:
        """Copy remote -> local; returns the bytes moved."""
        return self._run(items, timeout_s, to_remote=False)

    def write(self, items: Sequence[TransferItem], timeout_s: Optional[float]) -> int:
        """Copy local -> remote; returns the bytes moved."""
        return self._run(items, timeout_s, to_remote=True)

    def close(self) -> None:
        """Release mappings; idempotent. Waits for copies already running."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._cond.wait()
        self._release()

    def _run(self, items: Sequence[TransferItem], timeout_s: Optional[float], to_remote: bool) -> int:
        with self._cond:
            if self._closed:
                fail(LLMStatusCode.LLM_NOT_YET_LINK, "%s transport to peer pid %d is closed",
                     self.name, self.peer.pid)
            self._active += 1
        try:
            return self._checked_transfer(list(items), timeout_s, to_remote)
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def _checked_transfer(self, items: List[TransferItem], timeout_s: Optional[float],
                          to_remote: bool) -> int:
        for item in items:
            if not self.can_serve(self.peer, item.region):
                fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "transport %s cannot serve %s",
                     self.name, _describe(self.peer, item.region))
        segments = check_items(self.peer, items)
        total = segments.total_bytes
        if total == 0:
            return 0
        if timeout_s is not None and timeout_s <= 0:
            fail(LLMStatusCode.LLM_TIMEOUT, "%s %s of %d bytes with peer pid %d: deadline passed "
                 "before the copy started", self.name, "write" if to_remote else "read", total,
                 self.peer.pid)
        start = time.monotonic()
        self._transfer(items, segments, to_remote)
        elapsed = time.monotonic() - start
        if timeout_s is not None and elapsed > timeout_s:
            logger.warning("%s copy of %d bytes with peer pid %d took %.3f s, over its %.3f s "
                           "timeout (completed anyway)", self.name, total, self.peer.pid,
                           elapsed, timeout_s)
        return total

    @abc.abstractmethod
    def _transfer(self, items: List[TransferItem], segments: Segments, to_remote: bool) -> None:
        """Move the (validated, non-empty) segments; raise `LLMException` on failure."""

    def _release(self) -> None:
        """Drop whatever the transport holds; called once, with no copy in flight."""

    def describe(self, region: Region) -> str:
        return _describe(self.peer, region)


def copy_by_address(items: Sequence[TransferItem], segments: Segments, remote_bases: Sequence[int],
                    remote_device: str, to_remote: bool) -> None:
    """Copy between remote memory that is mapped here (at `remote_bases[i]` for item i) and the
    local tensors: one native call when everything is on CPU, else torch copies on the device."""
    if remote_device == "cpu" and all(item.local.device.type == "cpu" for item in items):
        remote, local = segments.addresses(remote_bases, [item.local.data_ptr() for item in items])
        src, dst = (local, remote) if to_remote else (remote, local)
        copy_addresses(src, dst, segments.lengths)
        return
    batches = []
    for item, base in zip(items, remote_bases):
        if not item.lengths.numel() or not item.region.nbytes:
            continue  # nothing to move, and a zero-byte region may have no valid address
        remote = _C.tensor_from_address(base, [item.region.nbytes], torch.uint8,
                                        torch.device(remote_device))
        if to_remote:
            batches.append(SegmentBatch(item.local, remote, item.local_offsets,
                                        item.remote_offsets, item.lengths))
        else:
            batches.append(SegmentBatch(remote, item.local, item.remote_offsets,
                                        item.local_offsets, item.lengths))
    copy_batches(batches)
