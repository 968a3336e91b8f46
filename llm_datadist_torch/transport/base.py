"""The data-plane interface: move byte segments between local and remote cache tensors.

The manager reduces every transfer, once and vectorised, to a list of `TransferItem`s (segments
between one remote tensor and one local raw tensor); a `Transport` checks the items' tensors
(`check_items`) and then moves the bytes in as few native calls as it can. The ranges of the
segments are checked by those native calls, before any byte moves, against region tables of
(base, size) per item (`Segments`): one overflow-safe rule, in csrc/segments.cpp, for every
backend; a segment outside its region or local tensor is `LLM_PARAM_INVALID`.

Timeouts: every backend here is a synchronous memcpy or syscall that cannot be interrupted,
so `timeout_s` is checked once, before any byte moves: a deadline already passed
(`timeout_s <= 0`) fails with `LLM_TIMEOUT`; `None` means no limit. A copy that overruns a
positive timeout completes and is logged, not failed: its bytes are already in place.
`mooncake` is the exception: a network transfer can stall, so it stops waiting at the deadline
(see mooncake.py).
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import threading
import time
from typing import ClassVar, List, NoReturn, Optional, Sequence, Tuple

import torch

from ..memory.native import _C
from ..memory.copy import (COPY_THREADS, SegmentBatch, SegmentRangeError, copy_batches,
                           item_index, refuse, region_table)
from ..core.descriptors import Region
from .. import faults
from ..status import LLMStatusCode, fail

logger = logging.getLogger(__name__)

WORD_BYTES = 8


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
    """All segments of a list of items, concatenated; `counts[i]` belong to item i, and
    `index[k]` is the item of segment k: its row in the region tables below."""

    peer: Peer
    items: Sequence[TransferItem]
    counts: List[int]
    index: torch.Tensor
    remote_offsets: torch.Tensor
    local_offsets: torch.Tensor
    lengths: torch.Tensor

    @property
    def total_bytes(self) -> int:
        return int(self.lengths.sum()) if self.lengths.numel() else 0

    def remote_regions(self, remote_bases: Sequence[int]) -> torch.Tensor:
        """The remote region table: item i's region is `region.nbytes` bytes at `remote_bases[i]`
        (where that memory is reached: its address in the peer, or a mapping of it here)."""
        return region_table([(base, item.region.nbytes)
                             for base, item in zip(remote_bases, self.items)], self._where)

    def local_regions(self) -> torch.Tensor:
        return region_table([(item.local.data_ptr(), item.local.nbytes) for item in self.items])

    def _where(self, i: int) -> str:
        return "item %d; %s" % (i, _describe(self.peer, self.items[i].region))

    def addresses(self, remote_bases: Sequence[int], local_bases: Sequence[int]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Absolute (remote, local) addresses of every segment, for backends that hand addresses
        to someone else (Mooncake); checked natively first like every copy."""
        local_regions = region_table([(base, item.local.nbytes)
                                      for base, item in zip(local_bases, self.items)])
        try:
            local, remote = _C.resolve_segments(local_regions, self.index, self.local_offsets,
                                                self.remote_regions(remote_bases), self.index,
                                                self.remote_offsets, self.lengths)
        except SegmentRangeError as exc:
            self.refuse(exc)
        return remote, local

    def check(self) -> None:
        """Only the range check (no address is used): for transfers with nothing to move."""
        try:
            _C.resolve_segments(region_table([(0, item.local.nbytes) for item in self.items]),
                                self.index, self.local_offsets,
                                self.remote_regions([0] * len(self.items)), self.index,
                                self.remote_offsets, self.lengths)
        except SegmentRangeError as exc:
            self.refuse(exc)

    def refuse(self, exc: SegmentRangeError, to_remote: Optional[bool] = None) -> NoReturn:
        """The native range error as `LLM_PARAM_INVALID`, naming the item, its region and peer
        (and, for a copy whose sides are source and destination, which of them is remote)."""
        sides = None if to_remote is None else (
            {"source": "local", "destination": "remote"} if to_remote
            else {"source": "remote", "destination": "local"})
        refuse(exc, self.counts, "item", where=lambda i: _describe(self.peer, self.items[i].region),
               sides=sides)


def _describe(peer: Peer, region: Region) -> str:
    where = f"{region.device} 0x{region.address:x} ({region.nbytes} bytes"
    if region.shm_name:
        where += f", /dev/shm/{region.shm_name}+{region.shm_offset}"
    return f"peer pid {peer.pid}, region {where})"


def check_items(peer: Peer, items: Sequence[TransferItem]) -> Segments:
    """Check what the native calls need of every item before any memory is touched: a
    contiguous 1-D uint8 local tensor, and 1-D int64 CPU offsets and lengths of one length
    (-> `LLM_PARAM_INVALID`). The ranges themselves are checked by the native copy."""
    plans = set()  # items usually share one plan's offset and length tensors: check each once
    for item in items:
        _check_local(peer, item)
        plan = (id(item.remote_offsets), id(item.local_offsets), id(item.lengths))
        if plan not in plans:
            _check_segment_tensors(peer, item)
            plans.add(plan)
    counts = [item.lengths.numel() for item in items]
    if not items:
        empty = torch.empty(0, dtype=torch.int64)
        return Segments(peer, [], [], empty, empty, empty, empty)
    return Segments(peer, list(items), counts, item_index(counts),
                    _cat([item.remote_offsets for item in items]),
                    _cat([item.local_offsets for item in items]),
                    _cat([item.lengths for item in items]))


def _cat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _check_local(peer: Peer, item: TransferItem) -> None:
    local = item.local
    if local.dtype != torch.uint8 or local.dim() != 1 or not local.is_contiguous():
        fail(LLMStatusCode.LLM_PARAM_INVALID,
             "local tensor must be a contiguous 1-D uint8 tensor, got %s %s (%s)",
             local.dtype, tuple(local.shape), _describe(peer, item.region))


def _check_segment_tensors(peer: Peer, item: TransferItem) -> None:
    n = item.lengths.numel()
    for name in ("remote_offsets", "local_offsets", "lengths"):
        t = getattr(item, name)
        if t.dtype != torch.int64 or t.device.type != "cpu" or t.dim() != 1 or t.numel() != n:
            fail(LLMStatusCode.LLM_PARAM_INVALID,
                 "%s must be a 1-D int64 CPU tensor of %d entries, got %s %s on %s (%s)",
                 name, n, t.dtype, tuple(t.shape), t.device, _describe(peer, item.region))


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
        self._lock = threading.Lock()  # taken directly by enter()/leave(): no Python frames
        self._cond = threading.Condition(self._lock)
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

    def read_word(self, region: Region, offset: int, timeout_s: Optional[float]) -> int:
        """The little-endian int64 at byte `offset` of `region` (a fence word)."""
        if not 0 <= offset <= region.nbytes - WORD_BYTES:
            fail(LLMStatusCode.LLM_PARAM_INVALID, "word at %d outside %s", offset,
                 self.describe(region))
        with self._in_use():
            return self._read_word(region, offset, timeout_s)

    def _read_word(self, region: Region, offset: int, timeout_s: Optional[float]) -> int:
        """(In use, `offset` checked.) Backends with a cheaper way than a copy override this."""
        word = torch.zeros(WORD_BYTES, dtype=torch.uint8)
        self._checked_transfer(
            [TransferItem(region, torch.tensor([offset], dtype=torch.int64), word,
                          torch.zeros(1, dtype=torch.int64),
                          torch.tensor([WORD_BYTES], dtype=torch.int64))], timeout_s, False)
        return int(word.view(torch.int64)[0])

    def _run(self, items: Sequence[TransferItem], timeout_s: Optional[float], to_remote: bool) -> int:
        with self._in_use():
            return self._checked_transfer(list(items), timeout_s, to_remote)

    def enter(self) -> None:
        """Start an operation: `close()` waits until `leave()` (`LLM_NOT_YET_LINK` once closed)."""
        with self._lock:
            if not self._closed:
                self._active += 1
                return
        fail(LLMStatusCode.LLM_NOT_YET_LINK, "%s transport to peer pid %d is closed",
             self.name, self.peer.pid)

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._closed and not self._active:  # close() waits for the last one
                self._cond.notify_all()

    @contextlib.contextmanager
    def _in_use(self):
        """One operation in flight: `close()` waits for it."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def native_bases(self, regions: Sequence[Region]) -> Optional[Tuple[int, List[int]]]:
        """(pid, bases): where the native copies reach each of `regions` (CPU memory): at
        `bases[i]` in process `pid`, or in this process when `pid` is 0 (the peer is this
        process, or its file is mapped here). None when this transport moves bytes some other
        way. Valid between `enter()` and `leave()` (a mapping lives until `close()`)."""
        return None

    def _checked_transfer(self, items: List[TransferItem], timeout_s: Optional[float],
                          to_remote: bool) -> int:
        for item in items:
            if not self.can_serve(self.peer, item.region):
                fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "transport %s cannot serve %s",
                     self.name, _describe(self.peer, item.region))
        segments = check_items(self.peer, items)
        total = segments.total_bytes
        if total == 0:
            segments.check()  # nothing to move, but a bad range is refused all the same
            return 0
        if timeout_s is not None and timeout_s <= 0:
            fail(LLMStatusCode.LLM_TIMEOUT, "%s %s of %d bytes with peer pid %d: deadline passed "
                 "before the copy started", self.name, "write" if to_remote else "read", total,
                 self.peer.pid)
        faults.before_copy(self.name)
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
        """Move the segments (items checked by `check_items`, at least one byte) through one of
        the native calls that check every range first (`copy_by_address`, `_C.cma_read`, ...,
        `Segments.addresses`); raise `LLMException` on failure."""

    def raise_os_error(self, exc: OSError, what: str) -> NoReturn:
        """A system call of this transport's failed while moving `what`."""
        fail(LLMStatusCode.LLM_FAILED, "%s %s with peer pid %d failed: %s", self.name, what,
             self.peer.pid, exc)

    def _release(self) -> None:
        """Drop whatever the transport holds; called once, with no copy in flight."""

    def describe(self, region: Region) -> str:
        return _describe(self.peer, region)


def copy_by_address(items: Sequence[TransferItem], segments: Segments, remote_bases: Sequence[int],
                    remote_device: str, to_remote: bool) -> None:
    """Copy between remote memory that is mapped here (at `remote_bases[i]` for item i) and the
    local tensors: one native call when everything is on CPU, else torch copies on the device.
    Either way every segment is checked natively against its region and local tensor first."""
    if remote_device == "cpu" and all(item.local.is_cpu for item in items):
        remote = (segments.remote_regions(remote_bases), segments.index, segments.remote_offsets)
        local = (segments.local_regions(), segments.index, segments.local_offsets)
        src, dst = (local, remote) if to_remote else (remote, local)
        try:
            _C.copy_segments(*src, *dst, segments.lengths, COPY_THREADS, True)
        except SegmentRangeError as exc:
            segments.refuse(exc, to_remote)
        return
    batches, numbers = [], []
    for number, (item, base) in enumerate(zip(items, remote_bases)):
        if not item.lengths.numel():
            continue
        if item.region.nbytes:
            try:
                remote = _C.tensor_from_address(base, [item.region.nbytes], torch.uint8,
                                                torch.device(remote_device))
            except (TypeError, ValueError) as exc:  # a negative size, an end past 2**64
                fail(LLMStatusCode.LLM_PARAM_INVALID, "item %d: %s (%s)", number, exc,
                     _describe(segments.peer, item.region))
        else:  # a zero-byte region may have no valid address; its segments are checked anyway
            remote = torch.empty(0, dtype=torch.uint8, device=remote_device)
        if to_remote:
            batches.append(SegmentBatch(item.local, remote, item.local_offsets,
                                        item.remote_offsets, item.lengths))
        else:
            batches.append(SegmentBatch(remote, item.local, item.remote_offsets,
                                        item.local_offsets, item.lengths))
        numbers.append(number)
    copy_batches(batches, where=lambda i: "item %d, %s" % (
        numbers[i], _describe(segments.peer, items[numbers[i]].region)))
