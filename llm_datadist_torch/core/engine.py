"""The engine behind one initialized `LLMDataDist`: device, pools, registrations, cache table.

The managers (`CacheManager`, `KvCacheManager`) validate arguments and delegate here. All
memory a cache uses is described by one raw uint8 tensor per cache tensor; typed views and
byte-level copies are both made from those.
"""
from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence

import torch

from ..memory.native import _C
from ..memory.arena import MemoryArena
from . import fences
from .cache_table import CacheEntry, CacheTable
from ..memory.device import device_range_allocated, resolve_device
from .options import EngineOptions, strict_limits
from ..memory.pool import MemoryPool
from .rwlock import ReadWriteLock
from ..cache_desc import CacheDesc
from ..data_type import DataType, itemsize, to_torch_dtype
from ..enums import Placement
from ..keys import CacheKey
from ..status import LLMStatusCode, fail, raise_if_false

logger = logging.getLogger(__name__)

PARAM = LLMStatusCode.LLM_PARAM_INVALID
MAX_DIMS = 31
STANDALONE_ALIGN = 4096


def tensor_bytes_of(desc: CacheDesc) -> int:
    """Bytes of one cache tensor, after the engine's shape rules (1..31 dims, all > 0)."""
    shape = desc.shape
    raise_if_false(shape is not None and 1 <= len(shape) <= MAX_DIMS,
                   "cache shape must have 1 to %d dimensions, got %r", MAX_DIMS, shape)
    raise_if_false(all(isinstance(d, int) and d > 0 for d in shape),
                   "cache shape dimensions must be > 0, got %r", shape)
    nbytes = math.prod(shape) * itemsize(desc.data_type)
    raise_if_false(nbytes < 2**63, "cache of shape %r is too large", shape)
    return nbytes


def typed_view(raw: torch.Tensor, shape, data_type: DataType) -> torch.Tensor:
    """The cache tensor as the user sees it: same memory, `shape`, mapped torch dtype."""
    if data_type == DataType.DT_STRING:  # 16-byte elements, no torch dtype (spec §26.9)
        return raw.view(*shape, 16)
    dtype = to_torch_dtype(data_type)
    try:
        return raw.view(dtype).view(*shape)
    except RuntimeError:  # a misaligned registered address: alias it directly instead
        return _C.tensor_from_address(raw.data_ptr(), list(shape), dtype, raw.device)


class Engine:
    def __init__(self, cluster_id: int, options: EngineOptions):
        self.cluster_id = cluster_id
        self.options = options
        self.device = resolve_device(options.device_id)
        self.fences = fences.acquire()  # held for the life of this engine: its caches' words
        self.table = CacheTable()
        self.registry = _C.MemoryRegistry()
        if not strict_limits():
            self.registry.set_limits(2**62, 2**62, 2**62)
        self.pools = {}
        self._state = ReadWriteLock()
        self.closed = False
        # Told (under the table lock) when remote-accessible memory comes and goes: the Mooncake
        # agent, once a link started it (transport/mooncake/agent.py).
        self.memory_listener = None
        try:
            for placement, config in ((Placement.DEVICE, options.mem_pool),
                                      (Placement.HOST, options.host_mem_pool)):
                if config is not None:
                    arena = MemoryArena.create(self.memory_device(placement), config.memory_size,
                                               tag=f"{cluster_id}.{placement.name.lower()}",
                                               pinned=self._pinned_host(placement))
                    self.pools[placement] = MemoryPool(arena, config.page_bytes)
        except BaseException:
            self._close_pools()
            fences.release()
            raise
        if self.device.type == "cpu":
            logger.info("cluster %d: no accelerator, Placement.DEVICE memory is CPU memory", cluster_id)

    # ---- lifecycle -------------------------------------------------------------------------
    def operation(self, closed_code: LLMStatusCode = PARAM) -> "_Operation":
        """`with engine.operation() as engine:` runs one API call: shared with other calls,
        excluded from `close()`."""
        return _Operation(self, closed_code)

    def close(self) -> None:
        with self._state.exclusive():
            if self.closed:
                return
            self.closed = True
            self.table.clear()
            fences.release()
            self._close_pools()
            self.registry = None

    def _close_pools(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools = {}

    # ---- placement -------------------------------------------------------------------------
    def memory_device(self, placement: Placement) -> torch.device:
        return self.device if placement == Placement.DEVICE else torch.device("cpu")

    def _pinned_host(self, placement: Placement) -> bool:
        return placement == Placement.HOST and self.device.type != "cpu"

    def has_pool(self, placement: Placement) -> bool:
        return placement in self.pools

    # ---- allocation ------------------------------------------------------------------------
    def allocate(self, desc: CacheDesc, cache_keys: Sequence[CacheKey] = (),
                 blocks_model_id: Optional[int] = None, is_blocks: bool = False,
                 from_pool: bool = True) -> CacheEntry:
        """Allocate a cache from the placement's pool (v2) or a memory block of its own (v1)."""
        cache_id = self.table.new_id()
        nbytes = tensor_bytes_of(desc)
        with self.table.lock:
            if from_pool:
                arena = self.pools[desc.placement].arena
                raw, release = self._carve_from_pool(desc.placement, nbytes, desc.num_tensors)
            else:
                arena, raw = self._standalone(desc.placement, nbytes, desc.num_tensors, cache_id)
                release = arena.close
            entry = CacheEntry(cache_id, desc.num_tensors, tuple(desc.shape), desc.data_type,
                               desc.placement, is_blocks, owned=True, remote_accessible=True,
                               tensor_bytes=nbytes, raw=raw,
                               release_memory=self._announced_release(cache_id, release),
                               shm_name=os.path.basename(arena.shm_path or ""),
                               shm_base=arena.tensor.data_ptr())
            try:
                if is_blocks:
                    self.table.add_blocks(entry, blocks_model_id, replace=False)
                else:
                    self.table.add(entry, cache_keys, allocated=True)
            except BaseException:
                release()
                raise
            self._announce(entry)
        return entry

    def _carve_from_pool(self, placement: Placement, nbytes: int, count: int):
        pool = self.pools[placement]
        carved = pool.allocate([nbytes] * count)
        if carved is None:
            code = (LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY if placement == Placement.DEVICE
                    else LLMStatusCode.LLM_OUT_OF_MEMORY)
            fail(code, "%s memory pool cannot fit %d tensors of %d bytes (%d bytes free)",
                 placement.name.lower(), count, nbytes, pool.allocator.free_bytes)
        offsets, raw = carved
        return raw, lambda: pool.free(offsets)

    def _standalone(self, placement: Placement, nbytes: int, count: int, cache_id: int):
        step = -(-nbytes // STANDALONE_ALIGN) * STANDALONE_ALIGN
        arena = MemoryArena.create(self.memory_device(placement), step * count,
                                   tag=f"{self.cluster_id}.cache{cache_id}",
                                   pinned=self._pinned_host(placement))
        return arena, [arena.slice(i * step, nbytes) for i in range(count)]

    # ---- registration ----------------------------------------------------------------------
    def register(self, desc: CacheDesc, addrs: List[int], cache_keys: Sequence[CacheKey] = (),
                 blocks_model_id: Optional[int] = None, is_blocks: bool = False,
                 remote_accessible: bool = True) -> CacheEntry:
        """Register caller-owned memory; bad, overlapping or too much memory is PARAM."""
        cache_id = self.table.new_id()
        nbytes = tensor_bytes_of(desc)
        raise_if_false(len(addrs) == desc.num_tensors, "%d addresses for %d tensors",
                       len(addrs), desc.num_tensors)
        raise_if_false(all(addr != 0 for addr in addrs), "cache addresses must not be 0")
        device = self.memory_device(desc.placement)
        on_host = device.type == "cpu"
        if not on_host:
            for addr in addrs:
                raise_if_false(device_range_allocated(device, addr, nbytes),
                               "address 0x%x (+%d bytes) is not memory allocated on %s",
                               addr, nbytes, device)
        with self.table.lock:
            try:
                if remote_accessible:
                    self.registry.register(cache_id, list(addrs), nbytes,
                                           desc.placement == Placement.DEVICE, on_host)
                elif on_host:
                    for addr in addrs:
                        raise_if_false(_C.is_mapped_rw(addr, nbytes),
                                       "address 0x%x (+%d bytes) is not writable memory of this "
                                       "process", addr, nbytes)
            except _C.RegistryError as exc:
                fail(PARAM, "register cache %d: %s", cache_id, exc)
            raw = [_C.tensor_from_address(addr, [nbytes], torch.uint8, device) for addr in addrs]
            release = (lambda: self.registry.unregister(cache_id)) if remote_accessible else None
            entry = CacheEntry(cache_id, desc.num_tensors, tuple(desc.shape), desc.data_type,
                               desc.placement, is_blocks, owned=False,
                               remote_accessible=remote_accessible, tensor_bytes=nbytes, raw=raw,
                               release_memory=self._announced_release(cache_id, release))
            try:
                if is_blocks:
                    self.table.add_blocks(entry, blocks_model_id, replace=True)
                else:
                    self.table.add(entry, cache_keys, allocated=False)
            except BaseException:
                if release is not None:
                    release()
                raise
            self._announce(entry)
        return entry

    def _announce(self, entry: CacheEntry) -> None:
        listener = self.memory_listener
        if listener is not None:
            listener.memory_added(entry)

    def _announced_release(self, cache_id: int, release):
        """`release`, preceded by telling the listener that the memory goes away."""
        if release is None:
            return None

        def run():
            listener = self.memory_listener
            if listener is not None:
                listener.memory_removed(cache_id)
            release()
        return run

    # ---- views -----------------------------------------------------------------------------
    def tensor_view(self, entry: CacheEntry, index: int) -> torch.Tensor:
        with self.table.lock:
            if not entry.handle_valid or not entry.raw:
                fail(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, "cache %d does not exist", entry.cache_id)
            raw = entry.raw[index]
        return typed_view(raw, entry.shape, entry.data_type)


class _Operation:
    """(A class, not a generator: every API call enters one.)"""

    __slots__ = ("_engine", "_closed_code", "_shared")

    def __init__(self, engine: Engine, closed_code: LLMStatusCode):
        self._engine = engine
        self._closed_code = closed_code

    def __enter__(self) -> Engine:
        shared = self._shared = self._engine._state.shared()
        shared.__enter__()
        if self._engine.closed:
            shared.__exit__(None, None, None)
            fail(self._closed_code, "llm datadist is finalized")
        return self._engine

    def __exit__(self, *exc) -> None:
        self._shared.__exit__(*exc)
