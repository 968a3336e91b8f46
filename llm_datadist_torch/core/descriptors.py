"""What one side tells the other about a cache: where a tensor lives and the cache's geometry.

The same msgspec structs travel on the wire (control/messages.py) and are used in memory by the
planner and the transports: no conversions between twin types.
"""
from __future__ import annotations

from typing import Annotated

import msgspec

# Sizes and counts as a peer may state them: checked when a message decodes.
Size = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Count = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
Name = Annotated[str, msgspec.Meta(max_length=255)]


class Region(msgspec.Struct, frozen=True):
    """Where one cache tensor lives in its owner's process."""

    address: Annotated[int, msgspec.Meta(ge=0)]  # in the owner process (msgpack: < 2**64)
    nbytes: Size          # bytes of the tensor
    device: Name = "cpu"  # torch device string of the memory ("cpu", "cuda:0", ...)
    shm_name: Name = ""   # /dev/shm file holding it ("" if not in an shm arena)
    shm_offset: Size = 0  # offset of the tensor inside that file


class Geometry(msgspec.Struct, frozen=True, array_like=True):
    """The shape of a cache as plans see it: tensors of `slots` equal rows of bytes."""

    num_tensors: Count
    slots: Count         # dimension 0: batch slots, or blocks of a blocks cache
    tensor_bytes: Size
    is_blocks: bool

    @property
    def stride(self) -> int:
        return self.tensor_bytes // self.slots


class Fence(msgspec.Struct, frozen=True):
    """Where the fence word of a cache lives and the value it holds while an answer about the
    cache holds (core/fences.py)."""

    region: Region  # the owner's fence table
    offset: Size
    value: int
