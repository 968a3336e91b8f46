"""Which bytes a pull or push moves: pure geometry, shared by both ends of a link.

The requesting side and the owning side run the same functions on the same inputs: the owner
to refuse a request before handing out any memory location, the requester to build its copy.
A plan is one list of byte segments applied to every (source tensor, destination tensor) pair,
so it is built once, vectorised, whatever the number of tensors.
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import torch

from .descriptors import Geometry
from ..status import LLMStatusCode, raise_if_false

PARAM = LLMStatusCode.LLM_PARAM_INVALID


@dataclasses.dataclass
class Plan:
    pairs: List[Tuple[int, int]]  # (source tensor index, destination tensor index)
    src_offsets: torch.Tensor     # int64 byte offsets, the same for every pair
    dst_offsets: torch.Tensor
    lengths: torch.Tensor

    @property
    def bytes_per_pair(self) -> int:
        return int(self.lengths.sum())


def tensor_pairs(src: Geometry, dst: Geometry, src_indices: Sequence[int],
                 dst_indices: Sequence[int]) -> List[Tuple[int, int]]:
    """Match source and destination tensors (spec §15.20); empty index lists mean "all"."""
    src_list = list(src_indices) or list(range(src.num_tensors))
    dst_list = list(dst_indices) or list(range(dst.num_tensors))
    raise_if_false(len(src_list) == len(dst_list), "%d source tensors for %d destination tensors",
                   len(src_list), len(dst_list))
    raise_if_false(all(0 <= i < src.num_tensors for i in src_list),
                   "source tensor indices %s outside a cache of %d tensors", src_list, src.num_tensors)
    raise_if_false(all(0 <= i < dst.num_tensors for i in dst_list),
                   "destination tensor indices %s outside a cache of %d tensors", dst_list, dst.num_tensors)
    return list(zip(src_list, dst_list))


def plan_slot_to_slot(src: Geometry, dst: Geometry, src_slot: int, dst_slot: int, nbytes: int,
                      pairs) -> Plan:
    """C2C: `nbytes` from the start of a source slot to the start of a destination slot."""
    raise_if_false(not src.is_blocks and not dst.is_blocks, "slot copies need contiguous caches")
    raise_if_false(src_slot < src.slots, "source batch index %d >= batch size %d", src_slot, src.slots)
    raise_if_false(dst_slot < dst.slots, "destination batch index %d >= batch size %d", dst_slot, dst.slots)
    raise_if_false(0 < nbytes <= src.stride and nbytes <= dst.stride,
                   "%d bytes do not fit slots of %d (source) / %d (destination) bytes",
                   nbytes, src.stride, dst.stride)
    return Plan(pairs, torch.tensor([src_slot * src.stride]), torch.tensor([dst_slot * dst.stride]),
                torch.tensor([nbytes]))


def plan_blocks_to_blocks(src: Geometry, dst: Geometry, src_blocks: Sequence[int],
                          dst_blocks: Sequence[int], pairs) -> Plan:
    """B2B: block src_blocks[i] to block dst_blocks[i]; block sizes must agree (§26.17)."""
    raise_if_false(src.is_blocks and dst.is_blocks, "block copies need blocks caches on both ends")
    raise_if_false(len(src_blocks) == len(dst_blocks) and len(dst_blocks) > 0,
                   "%d source blocks for %d destination blocks", len(src_blocks), len(dst_blocks))
    raise_if_false(src.stride == dst.stride, "block sizes differ: %d (source) / %d (destination) bytes",
                   src.stride, dst.stride)
    src_index = _block_index(src_blocks, src.slots, "source")
    dst_index = _block_index(dst_blocks, dst.slots, "destination")
    lengths = torch.full_like(src_index, src.stride)
    return Plan(pairs, src_index * src.stride, dst_index * dst.stride, lengths)


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
    dst_index = _block_index(dst_blocks, dst.slots, "destination")
    chunk = torch.arange(len(dst_blocks), dtype=torch.int64)
    lengths = torch.clamp(src.stride - chunk * block, max=block)
    return Plan(pairs, src_slot * src.stride + chunk * block, dst_index * block, lengths)


def _block_index(blocks: Sequence[int], count: int, side: str) -> torch.Tensor:
    blocks = list(blocks)
    # Plain min/max: a few torch ops on tiny tensors cost more than the whole check.
    raise_if_false(not blocks or (min(blocks) >= 0 and max(blocks) < count),
                   "%s block indices must be in [0, %d)", side, count)
    return torch.tensor(blocks, dtype=torch.int64)


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
