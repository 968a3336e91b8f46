"""What one side tells the other about a cache: where a tensor lives and the cache's geometry.

The same msgspec structs travel on the wire (control/messages.py) and are used in memory by the
planner and the transports: no conversions between twin types.
"""
from __future__ import annotations

import msgspec


class Region(msgspec.Struct, frozen=True):
    """Where one cache tensor lives in its owner's process."""

    address: int         # absolute address in the owner process
    nbytes: int          # bytes of the tensor
    device: str = "cpu"  # torch device string of the memory ("cpu", "cuda:0", ...)
    shm_name: str = ""   # /dev/shm file holding it ("" if not in an shm arena)
    shm_offset: int = 0  # offset of the tensor inside that file


class Geometry(msgspec.Struct, frozen=True, array_like=True):
    """The shape of a cache as plans see it: tensors of `slots` equal rows of bytes."""

    num_tensors: int
    slots: int          # dimension 0: batch slots, or blocks of a blocks cache
    tensor_bytes: int
    is_blocks: bool

    @property
    def stride(self) -> int:
        return self.tensor_bytes // self.slots
