"""`local`: both ends of the link live in this process, so the remote memory is just memory."""
from __future__ import annotations

import ctypes
from typing import List

from ..core.descriptors import Region
from .base import (Peer, Segments, TransferItem, Transport, check_items,
                   copy_by_address)


class LocalTransport(Transport):
    """Copies between tensors of one process, CPU or device, straight by address."""

    name = "local"
    moves_local_device_memory = True

    @classmethod
    def can_serve(cls, peer: Peer, region: Region) -> bool:
        return peer.same_process

    def native_bases(self, regions):
        if any(region.device != "cpu" for region in regions):
            return None
        return 0, [region.address for region in regions]

    def _read_word(self, region: Region, offset: int, timeout_s) -> int:
        if region.device != "cpu":
            return super()._read_word(region, offset, timeout_s)
        # Memory of this process that a proven same-process peer named: a fence word.
        return ctypes.c_int64.from_address(region.address + offset).value

    def _transfer(self, items: List[TransferItem], segments: Segments, to_remote: bool) -> None:
        devices = {item.region.device for item in items}
        if len(devices) == 1:
            copy_by_address(items, segments, [item.region.address for item in items],
                            devices.pop(), to_remote)
            return
        # Regions on several devices (rare): one batched pass per device.
        for device in sorted(devices):
            group = [item for item in items if item.region.device == device]
            copy_by_address(group, check_items(self.peer, group),
                            [item.region.address for item in group], device, to_remote)
