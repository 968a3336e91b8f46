"""`CacheManager`, the v2 cache API (spec §15): validate at the boundary, then delegate.

Argument errors are raised in the upstream order (TypeError / ValueError / LLMException) before
any state changes. After `finalize()` the checks still run and the call then fails with the code
upstream's binding returns for a missing engine (§26.12).
"""
from __future__ import annotations

import logging
from itertools import chain
from typing import Dict, List, Optional, Union

import torch

from .ops import layer_transfer, local_ops, transfer_args
from .ops.remote_ops import link_for, transfer
from .core.cache_table import CacheEntry
from ._checks import check_int64, check_isinstance, check_uint32, check_uint64
from .core.engine import Engine
from .cache import Cache
from .cache_desc import CacheDesc
from .enums import Memtype, Placement
from .keys import BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex
from .status import LLMStatusCode, fail, raise_if_false
from .transfer_types import CacheTask, LayerSynchronizer, MemInfo

logger = logging.getLogger(__name__)

UNREGISTER_WAIT_S = 10.0

PARAM = LLMStatusCode.LLM_PARAM_INVALID
FAILED = LLMStatusCode.LLM_FAILED


def _negative(name: str, value: int) -> None:
    raise TypeError(f"{name} only support non-negative int, but got {value}")


def check_tensor_index(cache, tensor_index) -> None:
    if isinstance(tensor_index, bool) or not isinstance(tensor_index, int):
        raise TypeError(f"tensor_index only support int, but got {type(tensor_index).__name__}")
    if not 0 <= tensor_index < cache.cache_desc.num_tensors:
        raise ValueError(f"tensor_index {tensor_index} out of range [0, {cache.cache_desc.num_tensors})")


class CacheManager:
    """Obtained from `LLMDataDist.cache_manager`; never constructed by users."""

    def __init__(self, engine: Engine, pool_required: bool = True, links=None):
        self._engine = engine
        self._links = links
        # v1 (KvCacheManager) allocates without a configured pool; v2 needs one.
        self._pool_required = pool_required
        self.linked_via_link = False  # set by LLMDataDist.link(); changes registration defaults
        # Code of calls reaching a finalized engine (besides register/allocate: LLM_FAILED);
        # KvCacheManager sets LLM_FAILED (spec §26.12).
        self.finalized_code = PARAM

    # ---- helpers ---------------------------------------------------------------------------
    def _entry(self, cache: Cache) -> CacheEntry:
        return self._engine.table.get(cache.cache_id)

    def _wrap(self, entry: CacheEntry, desc: CacheDesc, registered: bool) -> Cache:
        return Cache(entry.cache_id, desc, entry.addrs, self, registered, entry.is_blocks)

    def _default_remote_accessible(self, desc: CacheDesc, remote_accessible: Optional[bool]) -> bool:
        raise_if_false(not (self.linked_via_link and remote_accessible is True),
                       "remote_accessible=True is not allowed after link()")
        if remote_accessible is not None:
            return remote_accessible
        return desc.placement == Placement.DEVICE and not self.linked_via_link

    def _require_pool(self, desc: CacheDesc) -> None:
        # Python-side check on the configured options (not the live pools, which finalize()
        # drops): a stale manager must get past it and fail with LLM_FAILED (spec §15.0).
        options = self._engine.options
        configured = {Placement.DEVICE: options.mem_pool,
                      Placement.HOST: options.host_mem_pool}.get(desc.placement)
        raise_if_false(not self._pool_required or configured is not None,
                       "configure a memory pool matching the placement %s (mem_pool_cfg / "
                       "host_mem_pool_cfg)", desc.placement)

    def _uses_pool(self, desc: CacheDesc) -> bool:
        return self._engine.has_pool(desc.placement)

    def _require_any_pool(self) -> None:
        raise_if_false(not self._pool_required or bool(self._engine.pools), "no memory pool is configured",
                       status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED)

    # ---- registration ----------------------------------------------------------------------
    def register_cache(self, cache_desc: CacheDesc, addrs: List[int], cache_keys=(),
                       remote_accessible: Optional[bool] = None) -> Cache:
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("addrs", addrs, list, int)
        check_isinstance("cache_keys", cache_keys, (list, tuple), CacheKey)
        check_isinstance("remote_accessible", remote_accessible, bool)
        remote = self._default_remote_accessible(cache_desc, remote_accessible)
        raise_if_false(len(addrs) > 0, "addrs must not be empty")
        raise_if_false(len(addrs) == cache_desc.num_tensors, "%d addresses for %d tensors",
                       len(addrs), cache_desc.num_tensors)
        raise_if_false(all(addr != 0 for addr in addrs), "cache addresses must not be 0")
        with self._engine.operation(FAILED) as engine:
            entry = engine.register(cache_desc, addrs, cache_keys or (), remote_accessible=remote)
        return self._wrap(entry, cache_desc, registered=True)

    def register_blocks_cache(self, cache_desc: CacheDesc, addrs: List[int],
                              blocks_cache_key: Optional[BlocksCacheKey] = None,
                              remote_accessible: Optional[bool] = None) -> Cache:
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("addrs", addrs, list, int)
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey)
        check_isinstance("remote_accessible", remote_accessible, bool)
        remote = self._default_remote_accessible(cache_desc, remote_accessible)
        raise_if_false(len(addrs) > 0, "addrs must not be empty")
        cache_desc._is_blocks = True
        model_id = self._blocks_model_id(blocks_cache_key)
        with self._engine.operation(FAILED) as engine:
            entry = engine.register(cache_desc, addrs, blocks_model_id=model_id, is_blocks=True,
                                    remote_accessible=remote)
        return self._wrap(entry, cache_desc, registered=True)

    @staticmethod
    def _blocks_model_id(key: Optional[BlocksCacheKey]) -> Optional[int]:
        """The key's model id; its fields must be uint64 (the native binding's rule, §26.21)."""
        if key is None:
            return None
        for name in ("cluster_id", "model_id"):
            value = getattr(key, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
                raise TypeError(f"BlocksCacheKey.{name} only support uint64, but got {value!r}")
        return key.model_id

    def unregister_cache(self, cache_id: int) -> None:
        if isinstance(cache_id, bool) or not isinstance(cache_id, int):
            raise TypeError(f"cache_id only support int, but got {type(cache_id).__name__}")
        check_int64("cache_id", cache_id)
        with self._engine.operation(FAILED) as engine:
            entry = engine.table.lookup_by_id(cache_id)
            if entry is not None and entry.owned:
                logger.warning("unregister_cache(%d) on an allocated cache frees it now", cache_id)
            engine.table.drop(cache_id)
        # The caller frees its memory once we return: wait for copies still using it and for
        # peers that may still read it (told by the invalidation, which holds it meanwhile).
        if entry is not None and not engine.table.wait_unpinned(entry, UNREGISTER_WAIT_S):
            logger.error("unregister_cache(%d): a transfer still uses the memory after %.0f s; "
                         "do not free it until its peer is unlinked", cache_id, UNREGISTER_WAIT_S)

    # ---- pool allocation -------------------------------------------------------------------
    def allocate_cache(self, cache_desc: CacheDesc, cache_keys=()) -> Cache:
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("cache_keys", cache_keys, (list, tuple), CacheKey)
        raise_if_false(cache_desc.num_tensors > 0, "num_tensors must be > 0")
        self._require_pool(cache_desc)
        with self._engine.operation(FAILED) as engine:
            entry = engine.allocate(cache_desc, cache_keys or (), from_pool=self._uses_pool(cache_desc))
        return self._wrap(entry, cache_desc, registered=False)

    def allocate_blocks_cache(self, cache_desc: CacheDesc,
                              blocks_cache_key: Optional[BlocksCacheKey] = None) -> Cache:
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey)
        raise_if_false(cache_desc.num_tensors > 0, "num_tensors must be > 0")
        self._require_pool(cache_desc)
        cache_desc._is_blocks = True
        model_id = self._blocks_model_id(blocks_cache_key)
        with self._engine.operation(FAILED) as engine:
            entry = engine.allocate(cache_desc, blocks_model_id=model_id, is_blocks=True,
                                    from_pool=self._uses_pool(cache_desc))
        return self._wrap(entry, cache_desc, registered=False)

    def deallocate_cache(self, cache: Cache) -> None:
        check_isinstance("cache", cache, Cache)
        raise_if_false(not cache.is_blocks_cache, "deallocate_cache needs a contiguous cache; "
                       "use deallocate_blocks_cache")
        self._deallocate(cache)

    def deallocate_blocks_cache(self, cache: Cache) -> None:
        check_isinstance("cache", cache, Cache)
        raise_if_false(cache.is_blocks_cache, "deallocate_blocks_cache needs a blocks cache")
        self._deallocate(cache)

    def _deallocate(self, cache: Cache) -> None:
        with self._engine.operation(self.finalized_code) as engine:
            self._require_any_pool()
            entry = engine.table.lookup_by_id(cache.cache_id)
            if entry is None or not entry.owned or not entry.handle_valid:
                return  # unknown, freed or registered: a silent no-op upstream
            engine.table.release_handle(entry)
        cache._invalidate()

    def remove_cache_key(self, cache_key: CacheKey) -> None:
        check_isinstance("cache_key", cache_key, CacheKey)
        with self._engine.operation(self.finalized_code) as engine:
            self._require_any_pool()
            engine.table.remove_key(cache_key)

    # ---- local copies ----------------------------------------------------------------------
    def copy_cache(self, dst: Cache, src: Cache, dst_batch_index: int = 0, src_batch_index: int = 0,
                   offset: int = 0, size: int = -1, req_id: Optional[int] = None) -> None:
        check_isinstance("dst", dst, Cache)
        check_isinstance("src", src, Cache)
        check_uint32("dst_batch_index", dst_batch_index)
        check_uint32("src_batch_index", src_batch_index)
        check_uint64("offset", offset)
        check_int64("size", size)
        raise_if_false(not dst.is_blocks_cache and not src.is_blocks_cache,
                       "copy_cache needs contiguous caches")
        raise_if_false(size == -1 or size > 0, "size must be -1 or > 0, got %d", size)
        if req_id is not None:
            check_uint64("req_id", req_id)
        with self._engine.operation(self.finalized_code) as engine:
            dst_entry, src_entry = self._entry(dst), self._entry(src)
            local_ops.copy_cache(engine, dst_entry, src_entry, dst_batch_index, src_batch_index,
                                  offset, size)

    def copy_blocks(self, cache: Cache, copy_block_info: Dict[int, List[int]]) -> None:
        check_isinstance("cache", cache, Cache)
        check_isinstance("copy_block_info", copy_block_info, dict, int)
        values = list(copy_block_info.values())
        # One pass when every value is a plain list of ints: maps run to thousands of blocks, and
        # a check_isinstance per value costs ~1 ms per 4096 of them.
        if not (set(map(type, values)) <= {list}
                and set(map(type, chain.from_iterable(values))) <= {int, bool}):
            for targets in values:  # raises, naming the offender
                check_isinstance("copy_block_info value", targets, list, int, allow_none=False)
        raise_if_false(cache.is_blocks_cache, "copy_blocks needs a blocks cache")
        pairs = [(src, dst) for src, targets in copy_block_info.items() for dst in targets]
        for src, dst in pairs:
            if src < 0 or dst < 0:
                _negative("copy_block_info", min(src, dst))
        with self._engine.operation(self.finalized_code) as engine:
            local_ops.copy_blocks(engine, self._entry(cache), pairs)

    def swap_blocks(self, src_cache: Cache, dst_cache: Cache, src_to_dst: Dict[int, int]) -> None:
        check_isinstance("src_cache", src_cache, Cache)
        check_isinstance("dst_cache", dst_cache, Cache)
        raise_if_false(src_cache.is_blocks_cache and dst_cache.is_blocks_cache,
                       "swap_blocks needs blocks caches")
        check_isinstance("src_to_dst", src_to_dst, dict, int)
        src_desc, dst_desc = src_cache.cache_desc, dst_cache.cache_desc
        block_bytes = src_desc.size // src_desc.batch_size
        raise_if_false(block_bytes == dst_desc.size // dst_desc.batch_size,
                       "swap_blocks: block sizes differ (%d / %d bytes)", block_bytes,
                       dst_desc.size // dst_desc.batch_size)
        raise_if_false(src_desc.num_tensors == dst_desc.num_tensors,
                       "swap_blocks: %d source tensors, %d destination", src_desc.num_tensors,
                       dst_desc.num_tensors)
        for dst in src_to_dst.values():
            if isinstance(dst, bool) or not isinstance(dst, int):
                raise TypeError(f"src_to_dst values only support int, but got {type(dst).__name__}")
        in_range = [0 <= src < src_desc.batch_size and 0 <= dst < dst_desc.batch_size
                    for src, dst in src_to_dst.items()]
        if not all(in_range):
            src, dst = list(src_to_dst.items())[in_range.index(False)]
            fail(PARAM, "swap_blocks: pair %d -> %d out of range (%d / %d blocks)", src, dst,
                 src_desc.batch_size, dst_desc.batch_size)
        raise_if_false(local_ops.swap_direction_ok(src_desc.placement, dst_desc.placement),
                       "swap_blocks copies HOST -> DEVICE or DEVICE -> HOST, not %s -> %s",
                       src_desc.placement, dst_desc.placement)
        with self._engine.operation(self.finalized_code) as engine:
            local_ops.swap_blocks(engine, self._swap_side(src_cache), self._swap_side(dst_cache),
                                   block_bytes, list(src_to_dst.items()))

    def _swap_side(self, cache: Cache):
        if cache.cache_id == -1:  # a create_cpu_cache endpoint: caller-owned host memory
            return local_ops.raw_from_addresses(cache.tensor_addrs, cache.cache_desc.size), []
        entry = self._entry(cache)
        return entry.raw, [entry]

    # ---- transfers between clusters ---------------------------------------------------------
    @property
    def _remote_accessible_mode(self) -> bool:
        return self._engine.options.remote_accessible

    def _remote(self, engine: Engine, key, local: CacheEntry):
        return link_for(engine, self._links, key.cluster_id, local, self._remote_accessible_mode)

    def pull_cache(self, cache_key: Union[CacheKey, CacheKeyByIdAndIndex], cache: Cache,
                   batch_index: int = 0, size: int = -1, **kwargs) -> None:
        """Pull one remote batch slot into slot `batch_index` of a contiguous local cache."""
        key_types = (CacheKeyByIdAndIndex,) if self._remote_accessible_mode else (CacheKey, CacheKeyByIdAndIndex)
        check_isinstance("cache_key", cache_key, key_types)
        check_isinstance("cache", cache, Cache)
        check_uint32("batch_index", batch_index)
        check_int64("size", size)
        raise_if_false(not cache.is_blocks_cache, "pull_cache needs a contiguous local cache")
        raise_if_false(size == -1 or size > 0, "size must be -1 or > 0, got %d", size)
        src_tensors, dst_tensors = transfer_args.pull_tensor_indices(kwargs, cache.cache_desc.num_tensors)
        if isinstance(cache_key, CacheKey):
            transfer_args.check_request_key(cache_key)
        with self._engine.operation(self.finalized_code) as engine:
            local = self._entry(cache)
            link = self._remote(engine, cache_key, local)
            raise_if_false(batch_index < local.slots, "batch_index %d >= batch size %d", batch_index, local.slots)
            raise_if_false(size == -1 or size <= local.stride, "size %d > slot size %d", size, local.stride)
            transfer(engine, link, transfer_args.remote_ref(cache_key), local, "pull", "c2c",
                     local_slot=batch_index, nbytes=local.stride if size == -1 else size,
                     src_tensors=src_tensors, dst_tensors=dst_tensors,
                     release_keys=not self._remote_accessible_mode)

    def pull_blocks(self, src_cache_key, dst_cache: Cache, src_blocks=(), dst_blocks=(), **kwargs) -> None:
        """Pull remote blocks (B2B) or a remote slot cut into blocks (C2B) into a blocks cache."""
        check_isinstance("src_cache_key", src_cache_key, (CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey))
        check_isinstance("dst_cache", dst_cache, Cache)
        src_blocks = transfer_args.block_list("src_blocks", src_blocks)
        dst_blocks = transfer_args.block_list("dst_blocks", dst_blocks)
        raise_if_false(dst_cache.is_blocks_cache, "pull_blocks needs a blocks local cache")
        raise_if_false(len(dst_blocks) > 0, "dst_blocks must not be empty")
        src_tensors, dst_tensors = transfer_args.pull_tensor_indices(kwargs, dst_cache.cache_desc.num_tensors)
        blocks_key = isinstance(src_cache_key, BlocksCacheKey)
        if blocks_key:
            raise_if_false(len(src_blocks) > 0, "src_blocks must not be empty with a BlocksCacheKey")
            self._blocks_model_id(src_cache_key)
        else:
            if isinstance(src_cache_key, CacheKey):
                transfer_args.check_request_key(src_cache_key)
            raise_if_false(len(src_blocks) == 0, "src_blocks must be empty when pulling a batch slot")
        with self._engine.operation(self.finalized_code) as engine:
            local = self._entry(dst_cache)
            link = self._remote(engine, src_cache_key, local)
            transfer(engine, link, transfer_args.remote_ref(src_cache_key), local, "pull",
                     "b2b" if blocks_key else "c2b", src_blocks=src_blocks, dst_blocks=dst_blocks,
                     src_tensors=src_tensors, dst_tensors=dst_tensors,
                     release_keys=not self._remote_accessible_mode)

    def push_cache(self, dst_cache_key: CacheKeyByIdAndIndex, src_cache: Cache, src_batch_index: int = 0,
                   src_layer_range: Optional[range] = None, dst_layer_range: Optional[range] = None,
                   size: int = -1, tensor_num_per_layer: int = 2) -> None:
        """Write one local slot into a remote slot (remote-cache-accessible mode only)."""
        raise_if_false(self._remote_accessible_mode, "push_cache needs enable_remote_cache_accessible")
        check_isinstance("dst_cache_key", dst_cache_key, CacheKeyByIdAndIndex, allow_none=False)
        check_isinstance("src_cache", src_cache, Cache, allow_none=False)
        check_uint32("src_batch_index", src_batch_index)
        raise_if_false(not src_cache.is_blocks_cache, "push_cache needs a contiguous local cache")
        src_tensors, dst_tensors = transfer_args.push_tensor_indices(
            src_layer_range, dst_layer_range, tensor_num_per_layer, src_cache.cache_desc.num_tensors)
        check_int64("size", size)
        raise_if_false(size == -1, "push_cache only supports size=-1")
        with self._engine.operation(self.finalized_code) as engine:
            local = self._entry(src_cache)
            link = self._remote(engine, dst_cache_key, local)
            raise_if_false(src_batch_index < local.slots, "src_batch_index %d >= batch size %d",
                           src_batch_index, local.slots)
            transfer(engine, link, transfer_args.remote_ref(dst_cache_key), local, "push", "c2c",
                     local_slot=src_batch_index, nbytes=local.stride, src_tensors=src_tensors,
                     dst_tensors=dst_tensors)

    def push_blocks(self, dst_cache_key: BlocksCacheKey, src_cache: Cache, src_blocks=(), dst_blocks=(),
                    src_layer_range: Optional[range] = None, dst_layer_range: Optional[range] = None,
                    tensor_num_per_layer: int = 2) -> None:
        """Write local blocks into a remote blocks cache (remote-cache-accessible mode only)."""
        raise_if_false(self._remote_accessible_mode, "push_blocks needs enable_remote_cache_accessible")
        check_isinstance("dst_cache_key", dst_cache_key, BlocksCacheKey)
        check_isinstance("src_cache", src_cache, Cache)
        src_blocks = transfer_args.block_list("src_blocks", src_blocks)
        dst_blocks = transfer_args.block_list("dst_blocks", dst_blocks)
        raise_if_false(src_cache.is_blocks_cache, "push_blocks needs a blocks local cache")
        raise_if_false(len(dst_blocks) > 0, "dst_blocks must not be empty")
        src_tensors, dst_tensors = transfer_args.push_tensor_indices(
            src_layer_range, dst_layer_range, tensor_num_per_layer, src_cache.cache_desc.num_tensors)
        self._blocks_model_id(dst_cache_key)
        with self._engine.operation(self.finalized_code) as engine:
            local = self._entry(src_cache)
            link = self._remote(engine, dst_cache_key, local)
            transfer(engine, link, transfer_args.remote_ref(dst_cache_key), local, "push", "b2b",
                     src_blocks=src_blocks, dst_blocks=dst_blocks, src_tensors=src_tensors,
                     dst_tensors=dst_tensors)

    def transfer_cache_async(self, src_cache: Cache, layer_synchronizer: LayerSynchronizer,
                             transfer_configs, src_block_indices=None, dst_block_indices=None,
                             dst_block_memory_size: Optional[int] = None) -> CacheTask:
        """Push `src_cache` layer by layer, each layer once `layer_synchronizer` says it is
        computed, to destinations by raw address (`TransferConfig`) or, in
        remote-cache-accessible mode, by key (`TransferWithCacheKeyConfig`). Returns at once."""
        blocks = layer_transfer.check_arguments(
            src_cache, layer_synchronizer, transfer_configs, src_block_indices, dst_block_indices,
            dst_block_memory_size, self._remote_accessible_mode)
        return layer_transfer.start(self._engine, self._links, src_cache, layer_synchronizer,
                                     transfer_configs, blocks)

    # ---- fault handling --------------------------------------------------------------------
    def remap_registered_memory(self, mem_infos: Union[MemInfo, List[MemInfo]]) -> None:
        """Validated and accepted; torch memory never needs re-mapping for a NIC (§26.20)."""
        raise_if_false(isinstance(mem_infos, (list, MemInfo)),
                       "mem_infos must be a MemInfo or a list of MemInfo")
        infos = mem_infos if isinstance(mem_infos, list) else [mem_infos]
        for info in infos:
            raise_if_false(isinstance(info, MemInfo), "mem_infos elements must be MemInfo")
            raise_if_false(info.mem_type == Memtype.MEM_TYPE_DEVICE, "only device memory can be remapped")
            raise_if_false(info.addr != 0, "MemInfo.addr must not be 0")
            raise_if_false(info.size > 0, "MemInfo.size must be > 0")
        with self._engine.operation(self.finalized_code):
            raise_if_false(len(infos) > 0, "mem_infos must not be empty")

    # ---- torch views -----------------------------------------------------------------------
    def get_cache_tensors(self, cache: Cache, tensor_index: int = 0) -> List[torch.Tensor]:
        """[torch extension] `[view]` of tensor `tensor_index`, sharing the cache memory."""
        check_isinstance("cache", cache, Cache, allow_none=False)
        check_tensor_index(cache, tensor_index)
        with self._engine.operation(self.finalized_code) as engine:
            return [wait_and_view(engine, self._entry(cache), tensor_index)]


def wait_and_view(engine: Engine, entry: CacheEntry, tensor_index: int) -> torch.Tensor:
    """The typed view, after any transfer into the cache has finished (or LLM_TIMEOUT)."""
    timeout_s = engine.options.sync_kv_timeout_ms / 1000.0
    if not engine.table.wait_no_writers(entry, timeout_s):
        fail(LLMStatusCode.LLM_TIMEOUT, "cache %d is still being written after %d ms",
             entry.cache_id, engine.options.sync_kv_timeout_ms)
    return engine.tensor_view(entry, tensor_index)

