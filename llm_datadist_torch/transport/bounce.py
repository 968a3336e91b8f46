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

from ..memory.arena import MemoryArena
from ..memory.device import synchronize
from ..memory.chunks import pack, split_segments
from ..memory.copy import SegmentBatch, copy_batches
from ..status import LLMException
from .base import TransferItem, Transport

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


def _chunks(items: Sequence[TransferItem], capacity: int
            ) -> Iterator[List[Tuple[TransferItem, slice, torch.Tensor]]]:
    """Groups of (item, slice of its segments, their packed offsets in the buffer), each
    group filling at most `capacity` bytes; segments longer than the buffer are split."""
    split = [_split(item, capacity) for item in items]
    for chunk in pack([item.lengths for item in split], capacity):
        yield [(split[index], part, packed) for index, part, packed in chunk]


def _split(item: TransferItem, max_bytes: int) -> TransferItem:
    lengths, (remote_offsets, local_offsets) = split_segments(
        item.lengths, max_bytes, item.remote_offsets, item.local_offsets)
    if lengths is item.lengths:
        return item
    return TransferItem(item.region, remote_offsets, item.local, local_offsets, lengths)
