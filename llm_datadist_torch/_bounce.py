"""Local device memory that a transport cannot reach, moved through a host bounce buffer.

CMA and Mooncake (without a device build) read and write host memory only. When the requester's
own cache is on an accelerator, its segments are packed into a host buffer of this process
(pinned when an accelerator is in use, and registered with the Mooncake agent when one runs),
moved from there, and unpacked: chunk by chunk, so any transfer fits a fixed buffer.
"""
from __future__ import annotations

import threading
import time
from typing import Iterator, List, Sequence, Tuple

import torch

from ._arena import MemoryArena
from ._device import synchronize
from ._segments import SegmentBatch, copy_batches
from .status import LLMException
from .transport.base import TransferItem, Transport

BOUNCE_BYTES = 64 << 20


class BounceBuffer:
    """One per engine, created at its first use; transfers through it take turns."""

    def __init__(self, engine, nbytes: int = BOUNCE_BYTES):
        self._engine = engine
        self._nbytes = nbytes
        self._arena = None
        self._lock = threading.Lock()

    def _area(self) -> MemoryArena:
        """(Lock held.) The buffer, announced to the Mooncake agent (idempotent: the agent
        may have started after the buffer)."""
        if self._arena is None:
            self._arena = MemoryArena.create(torch.device("cpu"), self._nbytes,
                                             tag=f"{self._engine.cluster_id}.bounce",
                                             pinned=self._engine.device.type != "cpu")
        with self._engine.table.lock:
            listener = self._engine.memory_listener
            if listener is not None:
                listener.area_added(self._arena.tensor.data_ptr(), self._arena.nbytes)
        return self._arena

    def move(self, transport: Transport, items: Sequence[TransferItem], pulling: bool,
             deadline: float) -> int:
        """`transport.read` / `write` of `items`, with every local tensor replaced by the buffer."""
        moved = 0
        with self._lock:
            area = self._area()
            try:
                for chunk in _chunks(items, area.nbytes):
                    moved += self._move_chunk(transport, chunk, area, pulling, deadline)
            except LLMException as exc:
                in_flight = getattr(exc, "in_flight", None)  # Mooncake may still write the buffer
                if in_flight is not None:
                    self._arena = None  # never reused; freed once the transfer lets go
                    in_flight.add_done_callback(lambda: self._retire(area))
                raise
        return moved

    @staticmethod
    def _move_chunk(transport: Transport, chunk, area: MemoryArena, pulling: bool,
                    deadline: float) -> int:
        bounced, to_area, from_area = [], [], []
        for item, part, packed in chunk:
            lengths = item.lengths[part]
            bounced.append(TransferItem(item.region, item.remote_offsets[part], area.tensor, packed,
                                        lengths))
            to_area.append(SegmentBatch(item.local, area.tensor, item.local_offsets[part], packed,
                                        lengths))
            from_area.append(SegmentBatch(area.tensor, item.local, packed, item.local_offsets[part],
                                          lengths))
        device = chunk[0][0].local.device
        if pulling:
            moved = transport.read(bounced, deadline - time.monotonic())
            copy_batches(from_area)
            synchronize(device)
            return moved
        copy_batches(to_area)
        synchronize(device)
        return transport.write(bounced, deadline - time.monotonic())

    def _retire(self, arena: MemoryArena) -> None:
        with self._engine.table.lock:
            listener = self._engine.memory_listener
            if listener is not None:
                listener.area_removed(arena.tensor.data_ptr())
        arena.close()

    def close(self) -> None:
        with self._lock:
            arena, self._arena = self._arena, None
        if arena is not None:
            self._retire(arena)


def split_segments(item: TransferItem, max_bytes: int) -> TransferItem:
    """The same bytes in segments of at most `max_bytes` each (vectorised)."""
    lengths = item.lengths
    if not lengths.numel() or int(lengths.max()) <= max_bytes:
        return item
    pieces = (lengths + max_bytes - 1) // max_bytes
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), pieces)
    first = torch.cumsum(pieces, 0) - pieces
    step = (torch.arange(int(pieces.sum())) - first[owner]) * max_bytes
    piece_lengths = torch.clamp(lengths[owner] - step, max=max_bytes)
    return TransferItem(item.region, item.remote_offsets[owner] + step, item.local,
                        item.local_offsets[owner] + step, piece_lengths)


def _chunks(items: Sequence[TransferItem], capacity: int
            ) -> Iterator[List[Tuple[TransferItem, slice, torch.Tensor]]]:
    """Groups of (item, slice of its segments, their packed offsets in the buffer), each
    group filling at most `capacity` bytes."""
    chunk: List[Tuple[TransferItem, slice, torch.Tensor]] = []
    used = 0
    for item in items:
        item = split_segments(item, capacity)
        ends = torch.cumsum(item.lengths, 0)
        start, count = 0, item.lengths.numel()
        while start < count:
            base = int(ends[start - 1]) if start else 0
            # Segments [start, stop) fit into what is left of the buffer.
            stop = int(torch.searchsorted(ends, base + capacity - used, right=True))
            if stop == start:  # not even one more segment fits: flush
                yield chunk
                chunk, used = [], 0
                continue
            part = slice(start, stop)
            packed = used + (ends[part] - item.lengths[part]) - base
            chunk.append((item, part, packed))
            used += int(ends[stop - 1]) - base
            start = stop
    if chunk:
        yield chunk
