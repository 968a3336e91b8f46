"""Cache handles: `Cache` (v2, spec §10) and `KvCache` (v1, spec §21.4)."""
from __future__ import annotations

import logging
from typing import List

import torch

from ._checks import check_int64, check_isinstance
from .cache_desc import CacheDesc
from .enums import Placement
from .status import raise_if_false

logger = logging.getLogger(__name__)


class Cache:
    """A cache known to a `CacheManager`; returned by allocate/register, not built by users."""

    def __init__(self, cache_id: int, cache_desc: CacheDesc, tensor_addrs: List[int], cache_manager,
                 is_registered: bool, is_blocks_cache: bool):
        check_int64("cache_id", cache_id)
        self._cache_id = cache_id
        self._cache_desc = cache_desc
        self._tensor_addrs = tensor_addrs
        self._cache_manager = cache_manager
        self._is_registered = is_registered
        self._is_blocks_cache = is_blocks_cache
        self._valid = True

    @property
    def cache_id(self) -> int:
        return self._cache_id

    @property
    def cache_desc(self) -> CacheDesc:
        return self._cache_desc

    @property
    def tensor_addrs(self) -> List[int]:
        return self._tensor_addrs

    @property
    def is_blocks_cache(self) -> bool:
        return self._is_blocks_cache

    @property
    def tensors(self) -> List[torch.Tensor]:
        """[torch extension] Views of every tensor of the cache (they share its memory)."""
        return [self._cache_manager.get_cache_tensors(self, index)[0]
                for index in range(self._cache_desc.num_tensors)]

    def _invalidate(self) -> None:
        self._valid = False
        self._tensor_addrs = []

    @classmethod
    def create_cpu_cache(cls, cache_desc: CacheDesc, addrs: List[int]) -> "Cache":
        """Wrap caller-owned host memory as a `swap_blocks` endpoint (nothing is copied)."""
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("addrs", addrs, list, int)
        raise_if_false(cache_desc.placement == Placement.HOST,
                       "create_cpu_cache needs Placement.HOST, got %s", cache_desc.placement)
        raise_if_false(len(addrs) == cache_desc.num_tensors, "%d addresses for %d tensors",
                       len(addrs), cache_desc.num_tensors)
        return cls(-1, cache_desc, addrs, None, is_registered=False, is_blocks_cache=True)

    def __repr__(self) -> str:
        return (f"Cache(cache_id = {self._cache_id}, device_tensor_addrs = {len(self._tensor_addrs)}, "
                f"is_blocks_cache = {self._is_blocks_cache})")

    __str__ = __repr__


class KvCache:
    """The v1 cache handle; freed automatically when garbage collected (upstream safety net)."""

    def __init__(self, cache_id: int, cache_desc: CacheDesc, per_device_tensor_addrs: List[List[int]],
                 kv_cache_manager, is_blocks_cache: bool = False):
        check_int64("cache_id", cache_id)
        self._cache_id = cache_id
        self._cache_desc = cache_desc
        self._per_device_tensor_addrs = per_device_tensor_addrs
        self._kv_cache_manager = kv_cache_manager
        self._is_blocks_cache = is_blocks_cache
        self._valid = True

    @property
    def cache_id(self) -> int:
        return self._cache_id

    @property
    def cache_desc(self) -> CacheDesc:
        return self._cache_desc

    @property
    def per_device_tensor_addrs(self) -> List[List[int]]:
        return self._per_device_tensor_addrs

    @property
    def is_blocks_cache(self) -> bool:
        return self._is_blocks_cache

    def _invalidate(self) -> None:
        self._valid = False
        self._per_device_tensor_addrs = []

    @classmethod
    def create_cpu_cache(cls, cache_desc: CacheDesc, addrs) -> "KvCache":
        check_isinstance("cache_desc", cache_desc, CacheDesc, allow_none=False)
        raise_if_false(cache_desc.placement == Placement.HOST,
                       "create_cpu_cache needs Placement.HOST, got %s", cache_desc.placement)
        check_isinstance("addrs", addrs, list, allow_none=False)
        raise_if_false(len(addrs) > 0, "addrs must not be empty")
        kinds = set()
        for item in addrs:
            if isinstance(item, list):
                check_isinstance("addrs element", item, list, int)
                raise_if_false(len(item) == cache_desc.num_tensors, "%d addresses for %d tensors",
                               len(item), cache_desc.num_tensors)
                kinds.add(list)
            elif isinstance(item, int):
                kinds.add(int)
            else:
                raise TypeError(f"addrs elements only support list or int, got {type(item).__name__}")
        raise_if_false(len(kinds) == 1, "addrs mixes addresses and address lists")
        flat = int in kinds
        if flat:
            raise_if_false(len(addrs) == cache_desc.num_tensors, "%d addresses for %d tensors",
                           len(addrs), cache_desc.num_tensors)
        return cls(-1, cache_desc, [addrs] if flat else addrs, None, is_blocks_cache=True)

    def __del__(self):
        # Must never raise, also during interpreter shutdown when modules are half torn down.
        try:
            manager = self._kv_cache_manager
            if self._valid and manager is not None and manager.is_initialized():
                logger.debug("KvCache %d garbage collected, deallocating it", self._cache_id)
                if self._is_blocks_cache:
                    manager.deallocate_blocks_cache(self)
                else:
                    manager.deallocate_cache(self)
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"KvCache(cache_id = {self._cache_id}, num_devices = {len(self._per_device_tensor_addrs)})"

    __str__ = __repr__
