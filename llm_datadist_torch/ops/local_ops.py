"""Copies inside one process: `copy_cache`, `copy_blocks`, `swap_blocks` (spec §15.15-15.17).

Each operation turns its indices into byte segments once, the same for every tensor, and
makes one copy call for all tensors (`copy_pairs`), outside the table lock; the entries involved
are pinned meanwhile.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..memory.native import _C
from ..core.cache_table import CacheEntry
from ..core.engine import Engine
from ..memory.copy import copy_pairs
from ..enums import Placement
from ..status import LLMStatusCode, raise_if_false

PARAM = LLMStatusCode.LLM_PARAM_INVALID


def copy_cache(engine: Engine, dst: CacheEntry, src: CacheEntry, dst_batch_index: int,
               src_batch_index: int, offset: int, size: int) -> None:
    raise_if_false(dst.num_tensors == src.num_tensors, "copy_cache: %d source tensors, %d destination",
                   src.num_tensors, dst.num_tensors)
    raise_if_false(src_batch_index < src.slots, "src_batch_index %d >= batch size %d",
                   src_batch_index, src.slots)
    raise_if_false(dst_batch_index < dst.slots, "dst_batch_index %d >= batch size %d",
                   dst_batch_index, dst.slots)
    if offset > 0:
        raise_if_false(offset < src.stride and offset < dst.stride,
                       "offset %d is not inside a batch slot (%d / %d bytes)", offset, src.stride,
                       dst.stride)
    nbytes = src.stride - offset if size == -1 else size
    raise_if_false(nbytes <= src.stride - offset and nbytes <= dst.stride - offset,
                   "copy_cache: %d bytes from offset %d do not fit slots of %d / %d bytes",
                   nbytes, offset, src.stride, dst.stride)
    src_off = src_batch_index * src.stride + offset
    dst_off = dst_batch_index * dst.stride + offset
    with engine.table.pinned([src], [dst]):
        copy_pairs(src.raw, dst.raw, [src_off], [dst_off], [nbytes], ordered=dst is src)


def copy_blocks(engine: Engine, entry: CacheEntry, pairs: Sequence[Tuple[int, int]]) -> None:
    """Copy block s to block d for every (s, d), in order, in every tensor."""
    if not pairs:
        return
    raise_if_false(all(0 <= s < entry.slots and 0 <= d < entry.slots for s, d in pairs),
                   "copy_blocks: block indices must be in [0, %d)", entry.slots)
    # A block written twice, or written and read, needs the sequential order upstream has.
    targets = {dst for _, dst in pairs}
    dependent = len(targets) < len(pairs) or any(src in targets for src, _ in pairs)
    stride = entry.stride
    with engine.table.pinned([], [entry]):
        copy_pairs(entry.raw, entry.raw, [s * stride for s, _ in pairs],
                   [d * stride for _, d in pairs], [stride] * len(pairs), ordered=dependent)


def raw_from_addresses(addrs: Sequence[int], nbytes: int) -> List[torch.Tensor]:
    """Raw views over caller-owned host memory (a `create_cpu_cache` cache)."""
    for addr in addrs:
        raise_if_false(_C.is_mapped_rw(addr, nbytes),
                       "address 0x%x (+%d bytes) is not writable memory of this process", addr, nbytes)
    return [_C.tensor_from_address(addr, [nbytes], torch.uint8, torch.device("cpu")) for addr in addrs]


def swap_blocks(engine: Engine, src: Tuple[List[torch.Tensor], List[CacheEntry]],
                dst: Tuple[List[torch.Tensor], List[CacheEntry]], block_bytes: int,
                pairs: Sequence[Tuple[int, int]]) -> None:
    """Copy block s of every source tensor to block d of the same destination tensor.

    `src` / `dst` are (raw tensors, managed entries to pin) - a CPU cache has no entry.
    """
    if not pairs:
        return
    src_raw, src_entries = src
    dst_raw, dst_entries = dst
    duplicate_targets = len({d for _, d in pairs}) < len(pairs)
    with engine.table.pinned(src_entries, dst_entries):
        copy_pairs(src_raw, dst_raw, [s * block_bytes for s, _ in pairs],
                   [d * block_bytes for _, d in pairs], [block_bytes] * len(pairs),
                   ordered=duplicate_targets)


def swap_direction_ok(src_placement, dst_placement) -> bool:
    return {src_placement, dst_placement} == {Placement.HOST, Placement.DEVICE}
