"""`shm`: the owner's CPU caches live in /dev/shm files (`_arena.MemoryArena`); map them here
and copy directly, one-sided, with no thread of the owner on the data path.

Each file is mapped once per transport (per link), lazily at its first transfer, and unmapped
at `close()`. A file that is gone when first mapped means the owner finalized or crashed
(`LLM_LINK_FAILED`). Once mapped, the pages stay valid for this process even if the owner
unlinks the file or dies: reads then return the last contents and writes land in memory
nobody else sees; the control plane, not this module, notices that the peer is gone.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
from typing import Dict, List

from ..status import LLMStatusCode, fail
from ..core.descriptors import Region
from .base import (Peer, Segments, TransferItem, Transport, copy_by_address)

SHM_DIR = "/dev/shm"
POPULATE_MAX_BYTES = 1 << 30


class _Mapping:
    """One shared mapping of a whole /dev/shm file, read+write."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            # The owner populated the file, so MAP_POPULATE only fills our page tables, once
            # (about 50 ms per GiB here); otherwise every first read of a 4 KiB page costs a
            # fault inside a pull. Larger files are faulted in as they are read, so that the
            # first pull does not pay for the whole pool.
            populate = mmap.MAP_POPULATE if self.size <= POPULATE_MAX_BYTES else 0
            self._mmap = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | populate,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        # Take the address through a transient buffer export and drop it at once: no export
        # outlives this line, so close() can always unmap.
        view = ctypes.c_char.from_buffer(self._mmap)
        self.address = ctypes.addressof(view)
        del view

    def read_word(self, offset: int) -> int:
        return int.from_bytes(self._mmap[offset:offset + 8], "little", signed=True)

    def close(self) -> None:
        self._mmap.close()


class ShmTransport(Transport):
    """Copies between local tensors and a same-host peer's /dev/shm arena files."""

    name = "shm"
    moves_local_device_memory = True

    def __init__(self, peer: Peer):
        super().__init__(peer)
        self._maps: Dict[str, _Mapping] = {}
        self._maps_lock = threading.Lock()

    @classmethod
    def can_serve(cls, peer: Peer, region: Region) -> bool:
        return (peer.same_host and not peer.same_process and bool(region.shm_name)
                and region.device == "cpu")

    def _transfer(self, items: List[TransferItem], segments: Segments, to_remote: bool) -> None:
        _, bases = self.native_bases([item.region for item in items])
        copy_by_address(items, segments, bases, "cpu", to_remote)

    def native_bases(self, regions):
        return 0, [self._mapping(region).address + region.shm_offset for region in regions]

    def _read_word(self, region: Region, offset: int, timeout_s) -> int:
        mapping = self._mapping(region)  # checks that the region lies inside the file
        return mapping.read_word(region.shm_offset + offset)

    def _mapping(self, region: Region) -> _Mapping:
        name = region.shm_name
        with self._maps_lock:
            mapping = self._maps.get(name)
            if mapping is None:
                mapping = self._maps[name] = self._map(name, region)
        # The owner never shrinks its file; a region reaching past the end would SIGBUS. Same
        # rule as the native segment check (no offset + size that could wrap), though Python
        # integers would not.
        if (region.shm_offset < 0 or region.nbytes < 0 or region.shm_offset > mapping.size
                or region.nbytes > mapping.size - region.shm_offset):
            fail(LLMStatusCode.LLM_PARAM_INVALID, "region reaches past the end of its %d-byte "
                 "file (%s)", mapping.size, self.describe(region))
        return mapping

    def _map(self, name: str, region: Region) -> _Mapping:
        if "/" in name or name in (".", ".."):
            fail(LLMStatusCode.LLM_PARAM_INVALID, "shm name %r is not a file name in %s (%s)",
                 name, SHM_DIR, self.describe(region))
        path = os.path.join(SHM_DIR, name)
        try:
            return _Mapping(path)
        except FileNotFoundError:
            fail(LLMStatusCode.LLM_LINK_FAILED, "%s is gone: the owner finalized or crashed (%s)",
                 path, self.describe(region))
        except PermissionError as exc:
            fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "cannot open %s: %s (%s)", path, exc,
                 self.describe(region))
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            fail(LLMStatusCode.LLM_LINK_FAILED, "cannot map %s: %s (%s)", path, exc,
                 self.describe(region))

    def _release(self) -> None:
        with self._maps_lock:
            maps, self._maps = self._maps, {}
        for mapping in maps.values():
            mapping.close()
