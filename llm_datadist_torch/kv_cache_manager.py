"""`KvCacheManager`, the v1 cache API (spec §21.2), on the same engine as `CacheManager`.

v1 handles are `KvCache` objects and v1 allocates without a configured pool; everything else
(validation, key lifetimes, copies) is the v2 code, reached by translating the handles.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ._checks import check_isinstance
from .core.engine import Engine
from .cache import Cache, KvCache
from .cache_desc import CacheDesc
from .cache_manager import CacheManager, check_tensor_index, wait_and_view
from .keys import BlocksCacheKey, CacheKey
from .status import LLMStatusCode
from .transfer_types import CacheTask


class KvCacheManager:
    """Obtained from `LLMDataDist.kv_cache_manager` in v1 mode; never constructed by users."""

    def __init__(self, engine: Engine, links=None):
        self._engine = engine
        self._v2 = CacheManager(engine, pool_required=False, links=links)
        self._v2.finalized_code = LLMStatusCode.LLM_FAILED  # v1 after finalize (§26.12)

    def is_initialized(self) -> bool:
        return not self._engine.closed

    def _as_cache(self, name: str, cache: KvCache) -> Cache:
        check_isinstance(name, cache, KvCache)
        if cache is None:
            return None
        addrs = cache.per_device_tensor_addrs[0] if cache.per_device_tensor_addrs else []
        return Cache(cache.cache_id, cache.cache_desc, addrs, self._v2, False, cache.is_blocks_cache)

    def _as_kv_cache(self, cache: Cache) -> KvCache:
        return KvCache(cache.cache_id, cache.cache_desc, [cache.tensor_addrs], self,
                       is_blocks_cache=cache.is_blocks_cache)

    def allocate_cache(self, cache_desc: CacheDesc, cache_keys=()) -> KvCache:
        return self._as_kv_cache(self._v2.allocate_cache(cache_desc, cache_keys))

    def allocate_blocks_cache(self, cache_desc: CacheDesc, blocks_cache_key: BlocksCacheKey = None) -> KvCache:
        return self._as_kv_cache(self._v2.allocate_blocks_cache(cache_desc, blocks_cache_key))

    def deallocate_cache(self, cache: KvCache) -> None:
        self._v2.deallocate_cache(self._as_cache("cache", cache))
        cache._invalidate()

    def deallocate_blocks_cache(self, cache: KvCache) -> None:
        self._v2.deallocate_blocks_cache(self._as_cache("cache", cache))
        cache._invalidate()

    def remove_cache_key(self, cache_key: CacheKey) -> None:
        self._v2.remove_cache_key(cache_key)

    def copy_cache(self, dst: KvCache, src: KvCache, dst_batch_index: int = 0, src_batch_index: int = 0,
                   offset: int = 0, size: int = -1, req_id=None) -> None:
        self._v2.copy_cache(self._as_cache("dst", dst), self._as_cache("src", src), dst_batch_index,
                            src_batch_index, offset, size, req_id)

    def copy_blocks(self, cache: KvCache, copy_block_info: Dict[int, List[int]]) -> None:
        self._v2.copy_blocks(self._as_cache("cache", cache), copy_block_info)

    def swap_blocks(self, src_cache: KvCache, dst_cache: KvCache, src_to_dst: Dict[int, int]) -> None:
        self._v2.swap_blocks(self._as_cache("src_cache", src_cache),
                             self._as_cache("dst_cache", dst_cache), src_to_dst)

    def pull_cache(self, cache_key: CacheKey, cache: KvCache, batch_index: int = 0, size: int = -1,
                   **kwargs) -> None:
        self._v2.pull_cache(cache_key, self._as_cache("cache", cache), batch_index, size, **kwargs)

    def pull_blocks(self, src_cache_key, dst_cache: KvCache, src_blocks=(), dst_blocks=(), **kwargs) -> None:
        self._v2.pull_blocks(src_cache_key, self._as_cache("dst_cache", dst_cache), src_blocks, dst_blocks,
                             **kwargs)

    def transfer_cache_async(self, src_cache: KvCache, layer_synchronizer, transfer_configs,
                             src_block_indices=None, dst_block_indices=None,
                             dst_block_memory_size=None) -> CacheTask:
        return self._v2.transfer_cache_async(
            self._as_cache("src_cache", src_cache), layer_synchronizer, transfer_configs,
            src_block_indices, dst_block_indices, dst_block_memory_size)

    def get_cache_tensors(self, cache: KvCache, tensor_index: int = 0) -> List[torch.Tensor]:
        """One view per device entry of the cache (one device): `[view]`, sharing its memory.

        Waits for a transfer into the cache that is still in flight, at most `sync_kv_timeout`
        (`LLMException(LLM_TIMEOUT)` past it).
        """
        check_isinstance("cache", cache, KvCache, allow_none=False)
        check_tensor_index(cache, tensor_index)
        with self._engine.operation(LLMStatusCode.LLM_FAILED) as engine:
            return [wait_and_view(engine, engine.table.get(cache.cache_id), tensor_index)]
