"""`transfer_cache_async`: a layer-by-layer push that follows model execution (spec §15.14).

The arguments are checked before anything starts. A worker of the task pool then walks the
source layers in ascending order; for each layer some destination wants, it asks the
`LayerSynchronizer` whether the model has written it, then pushes its K and V tensors to every
such destination, both in one move where they can be. A destination is named by key
(`TransferWithCacheKeyConfig`: resolved and checked on the owner like any push) or by raw
addresses (`TransferConfig`: located on the owner, which refuses any range outside its
remote-accessible caches). Either is asked of the owner once per task, for all the layers of
the config; a layer then only picks its tensors, and the owner's fence word, read around every
move, still refuses a destination that went away meanwhile. Results are kept per destination
cluster id.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, List, Optional, Sequence, Union

from .._checks import check_isinstance, check_list_uint64, check_uint64
from ..core.cache_table import CacheEntry
from ..core.engine import Engine
from . import task_pool
from .remote_ops import link_for, move, resolve_request
from .transfer_args import remote_ref
from ..control.links import Link
from ..core.plan import (Geometry, Plan, interned, plan_blocks_to_blocks, plan_slot_to_blocks,
                         plan_slot_to_slot)
from ..cache import Cache
from ..control.messages import Locate, Located
from ..enums import Placement
from ..status import LLMException, LLMStatusCode, fail, raise_if_false
from ..transfer_types import CacheTask, LayerSynchronizer, TransferConfig, TransferWithCacheKeyConfig

logger = logging.getLogger(__name__)

SUCCESS = LLMStatusCode.LLM_SUCCESS
PARAM = LLMStatusCode.LLM_PARAM_INVALID
TENSORS_PER_LAYER = 2  # K and V: fixed for this API


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """The block selection shared by every destination of one task."""

    src_blocks: List[int]
    dst_blocks: List[int]
    block_bytes: int  # dst_block_memory_size; 0 when not given

    @property
    def op(self) -> str:
        if self.src_blocks:
            return "b2b"
        return "c2b" if self.dst_blocks else "c2c"


def _index_list(name: str, values) -> List[int]:
    check_isinstance(name, values, (list, tuple), int)
    if values is None:
        return []
    check_list_uint64(name, values)
    return list(values)


def check_arguments(src_cache, layer_synchronizer, transfer_configs, src_block_indices,
                    dst_block_indices, dst_block_memory_size, remote_accessible_mode: bool) -> BlockArgs:
    """Spec §15.14 steps 1-14, in order; fills `src_layer_range=None` in place (step 11)."""
    check_isinstance("src_cache", src_cache, Cache, allow_none=False)
    raise_if_false(src_cache.cache_desc.placement != Placement.HOST,
                   "transfer_cache_async does not send from HOST caches")
    dst_blocks = _index_list("dst_block_indices", dst_block_indices)
    src_blocks = _index_list("src_block_indices", src_block_indices)
    if dst_block_memory_size is not None:
        check_uint64("dst_block_memory_size", dst_block_memory_size)
    if src_blocks:
        raise_if_false(len(dst_blocks) > 0, "blocks to cache is not supported: dst_block_indices "
                       "must be given with src_block_indices")
        raise_if_false(len(src_blocks) == len(dst_blocks), "%d source blocks for %d destination "
                       "blocks", len(src_blocks), len(dst_blocks))
    elif dst_blocks:
        raise_if_false(dst_block_memory_size is not None,
                       "dst_block_memory_size is required with dst_block_indices")
    check_isinstance("layer_synchronizer", layer_synchronizer, LayerSynchronizer, allow_none=False)
    config_type = TransferWithCacheKeyConfig if remote_accessible_mode else TransferConfig
    check_isinstance("transfer_configs", transfer_configs, (list, tuple), config_type,
                     allow_none=False)
    if not dst_blocks:
        raise_if_false(dst_block_memory_size in (None, 0),
                       "dst_block_memory_size needs dst_block_indices")
    num_tensors = src_cache.cache_desc.num_tensors
    raise_if_false(num_tensors % TENSORS_PER_LAYER == 0,
                   "the source cache has %d tensors, not K and V per layer", num_tensors)
    num_layers = num_tensors // TENSORS_PER_LAYER
    for config in transfer_configs:
        if config.src_layer_range is None:
            config.src_layer_range = range(0, num_layers)
        layers = config.src_layer_range
        raise_if_false(not src_blocks or config.src_batch_index == 0,
                       "src_batch_index must be 0 when sending blocks")
        raise_if_false(0 <= layers.start < layers.stop <= num_layers,
                       "src_layer_range %s is outside the %d layers of the cache", layers, num_layers)
        if isinstance(config, TransferConfig):
            raise_if_false(len(config.dst_addrs) == TENSORS_PER_LAYER * len(layers),
                           "%d dst_addrs for %d layers (K and V per layer)", len(config.dst_addrs),
                           len(layers))
        else:
            raise_if_false(config.cache_key is not None, "cache_key is required")
            raise_if_false(config.dst_layer_range is not None
                           and len(config.dst_layer_range) == len(layers),
                           "dst_layer_range must match src_layer_range %s", layers)
    return BlockArgs(src_blocks, dst_blocks, dst_block_memory_size or 0)


def start(engine: Engine, links, src_cache: Cache, layer_synchronizer: LayerSynchronizer,
          transfer_configs: Sequence, blocks: BlockArgs) -> CacheTask:
    """Run a checked request on the task pool."""
    configs = list(transfer_configs)
    results: Dict[int, Optional[LLMStatusCode]] = {}
    task = _LayerTask(engine, links, src_cache.cache_id, src_cache.cache_desc.num_tensors,
                      layer_synchronizer, configs, blocks, results)
    return CacheTask(task_pool.submit(task.run), configs, results)


class _LayerTask:
    def __init__(self, engine: Engine, links, cache_id: int, num_tensors: int,
                 synchronizer: LayerSynchronizer, configs: list, blocks: BlockArgs,
                 results: Dict[int, Optional[LLMStatusCode]]):
        self._engine = engine
        self._links = links
        self._cache_id = cache_id
        self._num_layers = num_tensors // TENSORS_PER_LAYER
        self._synchronizer = synchronizer
        self._configs = configs
        self._blocks = blocks
        self._results = results
        # Per config (by position): where it sends, asked of the owner at its first layer.
        self._targets: Dict[int, Union["_KeyTarget", "_AddressTarget"]] = {}

    def run(self) -> None:
        try:
            self._run_layers()
        except Exception:  # a synchronizer or a bug: report it rather than a silent success
            logger.exception("transfer_cache_async of cache %d stopped", self._cache_id)
            for config in self._configs:
                self._results.setdefault(config.dst_cluster_id, LLMStatusCode.LLM_FAILED)

    def _run_layers(self) -> None:
        """Each layer to every destination that wants it; a destination that failed gets
        nothing more (its result says why), the others go on."""
        failed = set()
        for layer in range(self._num_layers):
            targets = [(n, c) for n, c in enumerate(self._configs)
                       if layer in c.src_layer_range and c.dst_cluster_id not in failed]
            if not targets:
                continue  # nobody wants this layer: the synchronizer is not asked either
            if not self._synchronizer.synchronize_layer(layer, None):
                for _, config in targets:
                    self._results[config.dst_cluster_id] = PARAM
                return
            for number, config in targets:
                if config.dst_cluster_id in failed:
                    continue  # an earlier config of the same destination failed on this layer
                try:
                    self._send_layer(number, config, layer)
                except LLMException as exc:
                    logger.error("transfer_cache_async: layer %d to cluster %d failed: %s", layer,
                                 config.dst_cluster_id, exc)
                    self._results[config.dst_cluster_id] = exc.status_code
                    failed.add(config.dst_cluster_id)
                    continue
                if layer == config.src_layer_range.stop - 1:
                    self._results[config.dst_cluster_id] = SUCCESS

    def _send_layer(self, number: int, config, layer: int) -> None:
        with self._engine.operation(PARAM) as engine:
            local = engine.table.get(self._cache_id)
            by_key = isinstance(config, TransferWithCacheKeyConfig)
            cluster_id = config.cache_key.cluster_id if by_key else config.dst_cluster_id
            link = link_for(engine, self._links, cluster_id, local, remote_accessible_mode=by_key)
            deadline = time.monotonic() + engine.options.sync_kv_timeout_ms / 1000.0
            target = self._targets.get(number)
            if target is None or target.link is not link:  # first layer, or linked anew since
                kind = _KeyTarget if by_key else _AddressTarget
                target = self._targets[number] = kind(engine, link, config, local, self._blocks,
                                                      deadline)
            target.send(engine, local, layer, deadline)


class _KeyTarget:
    """A destination named by key: one `Resolve` checks the push of every layer of the config."""

    def __init__(self, engine: Engine, link: Link, config: TransferWithCacheKeyConfig,
                 local: CacheEntry, blocks: BlockArgs, deadline: float):
        raise_if_false(blocks.op != "b2b" or blocks.block_bytes in (0, local.stride),
                       "dst_block_memory_size %d differs from the %d byte source blocks",
                       blocks.block_bytes, local.stride)
        self.link = link
        src_layers, dst_layers = config.src_layer_range, config.dst_layer_range
        # The intended mapping (spec §26.14): the i-th source layer goes to the i-th destination one.
        self._dst_layer_shift = dst_layers.start - src_layers.start
        self._reply, self._plan = resolve_request(
            engine, link, remote_ref(config.cache_key), local, "push", blocks.op, deadline,
            local_slot=config.src_batch_index, nbytes=local.stride, src_blocks=blocks.src_blocks,
            dst_blocks=blocks.dst_blocks, src_tensors=_tensors_of(src_layers),
            dst_tensors=_tensors_of(dst_layers),
            remote_block_bytes=blocks.block_bytes if blocks.op == "c2b" else 0)

    def send(self, engine: Engine, local: CacheEntry, layer: int, deadline: float) -> None:
        pairs = interned(tuple(zip(_layer_tensors(layer),
                                   _layer_tensors(layer + self._dst_layer_shift))))
        plan, reply = self._plan, self._reply
        move(engine, self.link, reply.cache_id, reply.fence, reply.regions,
             Plan(pairs, plan.src_offsets, plan.dst_offsets, plan.lengths), local, pulling=False,
             deadline=deadline)


class _AddressTarget:
    """A destination named by raw addresses: one `Locate` finds all of them on the owner."""

    def __init__(self, engine: Engine, link: Link, config: TransferConfig, local: CacheEntry,
                 blocks: BlockArgs, deadline: float):
        self.link = link
        self._first_layer = config.src_layer_range.start
        self._plan, extent = _address_plan(local.geometry, blocks, config.src_batch_index)
        reply = link.call(Locate(session=link.session, addresses=list(config.dst_addrs),
                                 nbytes=extent), deadline - time.monotonic())
        if not isinstance(reply, Located) or len(reply.places) != len(config.dst_addrs):
            fail(LLMStatusCode.LLM_FAILED, "unexpected answer %s from cluster %d",
                 type(reply).__name__, link.cluster_id)
        self._places = reply.places

    def send(self, engine: Engine, local: CacheEntry, layer: int, deadline: float) -> None:
        """K and V in one move when they lie at the same offset of tensors of one cache (the
        usual case: the addresses of the destination's K and V tensors), else one each."""
        first = TENSORS_PER_LAYER * (layer - self._first_layer)
        groups: Dict[tuple, list] = {}
        for src_tensor, place in zip(_layer_tensors(layer),
                                     self._places[first:first + TENSORS_PER_LAYER]):
            groups.setdefault((place.cache_id, place.fence, place.offset), []).append(
                (src_tensor, place))
        for (cache_id, fence, offset), members in groups.items():
            pairs = interned(tuple((src_tensor, place.tensor) for src_tensor, place in members))
            regions = {place.tensor: place.region for _, place in members}
            move(engine, self.link, cache_id, fence, regions, self._plan.shifted(pairs, offset),
                 local, pulling=False, deadline=deadline)


def _tensors_of(layers: range) -> List[int]:
    return [tensor for layer in layers for tensor in _layer_tensors(layer)]


def _layer_tensors(layer: int) -> List[int]:
    return [TENSORS_PER_LAYER * layer + k for k in range(TENSORS_PER_LAYER)]


def _address_plan(src: Geometry, blocks: BlockArgs, src_slot: int):
    """The segments written from one source tensor to one raw destination address, and how
    many bytes from that address they may touch.

    The destination is described as the smallest cache it could be: one slot of the source
    slot's size (C2C), or blocks up to the highest destination block index.
    """
    op = blocks.op
    if op == "c2c":
        dst = Geometry(1, 1, src.stride, False)
        return plan_slot_to_slot(src, dst, src_slot, 0, src.stride, []), dst.tensor_bytes
    if op == "c2b":
        block = blocks.block_bytes
        raise_if_false(0 < block < src.tensor_bytes, "dst_block_memory_size %d must be in "
                       "(0, %d) for a contiguous source", block, src.tensor_bytes)
    else:
        block = src.stride
        raise_if_false(src.is_blocks, "src_block_indices need a blocks source cache")
        raise_if_false(blocks.block_bytes in (0, block), "dst_block_memory_size %d differs from "
                       "the %d byte source blocks", blocks.block_bytes, block)
    count = max(blocks.dst_blocks) + 1
    dst = Geometry(1, count, count * block, True)
    if op == "c2b":
        return plan_slot_to_blocks(src, dst, src_slot, blocks.dst_blocks, []), dst.tensor_bytes
    return plan_blocks_to_blocks(src, dst, blocks.src_blocks, blocks.dst_blocks, []), dst.tensor_bytes
