"""Cut a list of byte segments into chunks that each fit a fixed buffer.

Staging areas and bounce buffers have a fixed size; a transfer of any size goes through them
chunk by chunk. Segments longer than the buffer are split first, so every transfer fits.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch


def split_segments(lengths: torch.Tensor, max_bytes: int, *offsets: torch.Tensor
                   ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The same bytes in segments of at most `max_bytes`: (lengths, each `offsets` shifted).

    numpy, not torch.repeat_interleave: a parallel torch kernel leaves an OpenMP worker spinning
    on the core the copy threads need (see copy.py, `item_index`).
    """
    if max_bytes <= 0:
        raise ValueError(f"cannot split segments into pieces of {max_bytes} bytes")
    if not lengths.numel() or int(lengths.max()) <= max_bytes:
        return lengths, list(offsets)
    length_array = lengths.numpy()
    pieces = (length_array + max_bytes - 1) // max_bytes
    owner = np.repeat(np.arange(len(length_array)), pieces)
    first = np.cumsum(pieces) - pieces
    step = (np.arange(int(pieces.sum())) - first[owner]) * max_bytes
    piece_lengths = np.minimum(length_array[owner] - step, max_bytes)
    return (torch.from_numpy(piece_lengths),
            [torch.from_numpy(o.numpy()[owner] + step) for o in offsets])


def pack(lengths: Sequence[torch.Tensor], capacity: int
         ) -> Iterator[List[Tuple[int, slice, torch.Tensor]]]:
    """Chunks of consecutive segments of several lists, each filling at most `capacity` bytes.

    A chunk is a list of (list index, slice of its segments, their packed offsets in the
    buffer). Every segment must be at most `capacity` bytes (`split_segments` first).
    """
    chunk: List[Tuple[int, slice, torch.Tensor]] = []
    used = 0
    for index, item_lengths in enumerate(lengths):
        if item_lengths.numel() and int(item_lengths.max()) > capacity:
            raise ValueError(f"a {int(item_lengths.max())} byte segment does not fit a "
                             f"{capacity} byte buffer")
        ends = torch.cumsum(item_lengths, 0)
        start, count = 0, item_lengths.numel()
        while start < count:
            base = int(ends[start - 1]) if start else 0
            # Segments [start, stop) fit into what is left of the buffer.
            stop = int(torch.searchsorted(ends, base + capacity - used, right=True))
            if stop == start:  # not even one more segment fits: flush
                yield chunk
                chunk, used = [], 0
                continue
            part = slice(start, stop)
            chunk.append((index, part, used + (ends[part] - item_lengths[part]) - base))
            used += int(ends[stop - 1]) - base
            start = stop
    if chunk:
        yield chunk
