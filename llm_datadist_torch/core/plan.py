"""Which bytes a pull or push moves: pure geometry, shared by both ends of a link.

The requesting side and the owning side run the same functions on the same inputs: the owner
to refuse a request before handing out any memory location, the requester to build its copy.
A plan is one list of byte segments applied to every (source tensor, destination tensor) pair,
so it is built once whatever the number of tensors. Its offsets are plain lists: a call usually
moves a few blocks, and the native copy takes lists as they are (`tensors()` for the paths that
need int64 tensors).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import List, Sequence, Tuple

import torch

from .descriptors import Geometry
from ..status import LLMStatusCode, raise_if_false

PARAM = LLMStatusCode.LLM_PARAM_INVALID


Pairs = Tuple[Tuple[int, int], ...]  # (source tensor index, destination tensor index)


@dataclasses.dataclass
class Plan:
    pairs: Pairs
    src_offsets: List[int]  # byte offsets, the same for every pair
    dst_offsets: List[int]
    lengths: List[int]

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(src_offsets, dst_offsets, lengths) as int64 tensors."""
        return tuple(torch.tensor(v, dtype=torch.int64)
                     for v in (self.src_offsets, self.dst_offsets, self.lengths))

    def shifted(self, pairs: Pairs, dst_shift: int) -> "Plan":
        """The same segments between other tensors, `dst_shift` bytes further in the destination."""
        return Plan(pairs, self.src_offsets, [o + dst_shift for o in self.dst_offsets],
                    self.lengths)


@functools.lru_cache(maxsize=4096)
def interned(pairs: Pairs) -> Pairs:
    """One tuple object for equal pairs: a link keeps prepared transfers by pairs object."""
    return pairs


def tensor_pairs(src: Geometry, dst: Geometry, src_indices: Sequence[int],
                 dst_indices: Sequence[int]) -> Pairs:
    """Match source and destination tensors (spec §15.20); empty index lists mean "all"."""
    return _pairs(src.num_tensors, dst.num_tensors, tuple(src_indices), tuple(dst_indices))


@functools.lru_cache(maxsize=256)  # a caller moves the same tensors call after call
def _pairs(src_count: int, dst_count: int, src_indices: Tuple[int, ...],
           dst_indices: Tuple[int, ...]) -> Pairs:
    src_list = src_indices or tuple(range(src_count))
    dst_list = dst_indices or tuple(range(dst_count))
    raise_if_false(len(src_list) == len(dst_list), "%d source tensors for %d destination tensors",
                   len(src_list), len(dst_list))
    raise_if_false(all(0 <= i < src_count for i in src_list),
                   "source tensor indices %s outside a cache of %d tensors", list(src_list), src_count)
    raise_if_false(all(0 <= i < dst_count for i in dst_list),
                   "destination tensor indices %s outside a cache of %d tensors", list(dst_list),
                   dst_count)
    return tuple(zip(src_list, dst_list))


def plan_slot_to_slot(src: Geometry, dst: Geometry, src_slot: int, dst_slot: int, nbytes: int,
                      pairs) -> Plan:
    """C2C: `nbytes` from the start of a source slot to the start of a destination slot."""
    raise_if_false(not src.is_blocks and not dst.is_blocks, "slot copies need contiguous caches")
    raise_if_false(src_slot < src.slots, "source batch index %d >= batch size %d", src_slot, src.slots)
    raise_if_false(dst_slot < dst.slots, "destination batch index %d >= batch size %d", dst_slot, dst.slots)
    raise_if_false(0 < nbytes <= src.stride and nbytes <= dst.stride,
                   "%d bytes do not fit slots of %d (source) / %d (destination) bytes",
                   nbytes, src.stride, dst.stride)
    return Plan(pairs, [src_slot * src.stride], [dst_slot * dst.stride], [nbytes])


def plan_blocks_to_blocks(src: Geometry, dst: Geometry, src_blocks: Sequence[int],
                          dst_blocks: Sequence[int], pairs) -> Plan:
    """B2B: block src_blocks[i] to block dst_blocks[i]; block sizes must agree (§26.17)."""
    raise_if_false(src.is_blocks and dst.is_blocks, "block copies need blocks caches on both ends")
    raise_if_false(len(src_blocks) == len(dst_blocks) and len(dst_blocks) > 0,
                   "%d source blocks for %d destination blocks", len(src_blocks), len(dst_blocks))
    raise_if_false(src.stride == dst.stride, "block sizes differ: %d (source) / %d (destination) bytes",
                   src.stride, dst.stride)
    stride = src.stride
    return Plan(pairs, _block_offsets(src_blocks, src.slots, stride, "source"),
                _block_offsets(dst_blocks, dst.slots, stride, "destination"),
                [stride] * len(src_blocks))


def plan_slot_to_blocks(src: Geometry, dst: Geometry, src_slot: int, dst_blocks: Sequence[int],
                        pairs) -> Plan:
    """C2B: a source slot cut into destination-block-sized chunks; chunk j -> dst_blocks[j]."""
    raise_if_false(not src.is_blocks and dst.is_blocks, "C2B needs a contiguous source and a blocks "
                   "destination")
    raise_if_false(src_slot < src.slots, "source batch index %d >= batch size %d", src_slot, src.slots)
    block = dst.stride
    chunks = -(-src.stride // block)
    raise_if_false(0 < len(dst_blocks) <= chunks, "%d destination blocks for a %d byte slot of %d "
                   "chunks", len(dst_blocks), src.stride, chunks)
    base = src_slot * src.stride
    chunks = range(len(dst_blocks))
    return Plan(pairs, [base + j * block for j in chunks],
                _block_offsets(dst_blocks, dst.slots, block, "destination"),
                [min(src.stride - j * block, block) for j in chunks])


def _block_offsets(blocks: Sequence[int], count: int, stride: int, side: str) -> List[int]:
    raise_if_false(not blocks or (min(blocks) >= 0 and max(blocks) < count),
                   "%s block indices must be in [0, %d)", side, count)
    return [b * stride for b in blocks]


def build_plan(op: str, src: Geometry, dst: Geometry, src_slot: int, dst_slot: int, nbytes: int,
               src_blocks: Sequence[int], dst_blocks: Sequence[int], src_tensors: Sequence[int],
               dst_tensors: Sequence[int]) -> Plan:
    """The plan of one request; `op` is "c2c", "b2b" or "c2b" (B2C does not exist upstream)."""
    pairs = tensor_pairs(src, dst, src_tensors, dst_tensors)
    if op == "c2c":
        return plan_slot_to_slot(src, dst, src_slot, dst_slot, nbytes, pairs)
    if op == "b2b":
        return plan_blocks_to_blocks(src, dst, src_blocks, dst_blocks, pairs)
    raise_if_false(op == "c2b", "unknown transfer kind %r", op)
    return plan_slot_to_blocks(src, dst, src_slot, dst_blocks, pairs)
