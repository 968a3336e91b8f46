"""The owner's side of remote requests: find the cache a peer names, check its plan, answer.

A peer only ever learns the location of memory that was registered for remote access (or
allocated from a pool) and that belongs to the key it named, and only after the geometry of its
request was checked here against the owner's own table.
"""
from __future__ import annotations

import bisect
import os
import threading
from typing import Dict, Optional, Sequence, Set, Tuple

import torch

from ..memory.arena import MemoryArena
from ..core.cache_table import CacheEntry, KeyBinding, blocks_key_identity
from ..memory.device import synchronize
from ..core.engine import Engine
from ..memory.copy import SegmentBatch, copy_batches
from ..core.descriptors import Fence, Region
from ..core.fences import fence_table
from ..core.plan import build_plan
from .messages import STAGING_BYTES, Locate, Located, Place, Pulled, Resolve, Resolved, StageRead
from ..enums import Placement
from ..keys import INVALID_ID
from ..status import LLMStatusCode, fail, raise_if_false

NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
# Staging areas one engine keeps at most (each STAGING_BYTES of /dev/shm, one per requester
# that moves device memory); freed when the requester's link goes.
# Request keys one peer may still release (answered, not yet released); beyond, the oldest are
# forgotten and left to remove_cache_key.
MAX_RELEASABLE = 4096
MAX_STAGING_AREAS = int(os.environ.get("LLM_DATADIST_TORCH_MAX_STAGING_AREAS", "8"))


class Responder:
    def __init__(self, engine: Engine):
        self._engine = engine
        self._staging: Dict[int, MemoryArena] = {}  # requester cluster id -> its staging area
        self._staging_lock = threading.Lock()

    # ---- staging: memory a requester cannot reach (device memory of another process) -------
    def staging_area(self, requester: int) -> Region:
        return _region_of(self._area(requester))

    def _announce(self, area: MemoryArena, added: bool) -> None:
        """Tell the Mooncake agent, if one runs, so that peers on other hosts reach the area."""
        with self._engine.table.lock:
            listener = self._engine.memory_listener
            if listener is not None:
                if added:
                    listener.area_added(area.tensor.data_ptr(), area.nbytes)
                else:
                    listener.area_removed(area.tensor.data_ptr())

    def stage(self, requester: int, request: StageRead, to_staging: bool) -> Region:
        """Copy segments of a cache into the requester's staging area (or back, for a write)."""
        with self._engine.operation():
            entry = self._engine.table.lookup_by_id(request.cache_id)
            if entry is None or entry.fence is None or entry.fence[1] != request.fence:
                fail(NOT_EXIST, "cache %d does not exist (or is no longer the cache it was)",
                     request.cache_id)
            raise_if_false(entry.remote_accessible,
                           "cache %d was not registered for remote access", entry.cache_id)
            raise_if_false(all(0 <= t < entry.num_tensors for t in request.tensors),
                           "tensor indices %s outside a cache of %d tensors", request.tensors,
                           entry.num_tensors)
            area = self._area(requester)
            offsets = torch.tensor(request.offsets, dtype=torch.int64)
            lengths = torch.tensor(request.lengths, dtype=torch.int64)
            chunk = int(lengths.sum())
            raise_if_false(chunk * len(request.tensors) <= area.nbytes,
                           "%d staged bytes exceed the %d byte staging area",
                           chunk * len(request.tensors), area.nbytes)
            packed = torch.cumsum(lengths, 0) - lengths
            batches = []
            for k, tensor in enumerate(request.tensors):
                here = packed + k * chunk
                if to_staging:
                    batches.append(SegmentBatch(entry.raw[tensor], area.tensor, offsets, here, lengths))
                else:
                    batches.append(SegmentBatch(area.tensor, entry.raw[tensor], here, offsets, lengths))
            with self._engine.table.pinned([entry] if to_staging else [], [] if to_staging else [entry]):
                copy_batches(batches)
                synchronize(entry.raw[0].device)
            return _region_of(area)

    def drop_staging(self, requester: int) -> None:
        with self._staging_lock:
            area = self._staging.pop(requester, None)
        if area is not None:
            self._announce(area, added=False)
            area.close()

    def close(self) -> None:
        with self._staging_lock:
            areas, self._staging = list(self._staging.values()), {}
        for area in areas:
            self._announce(area, added=False)
            area.close()

    def _area(self, requester: int) -> MemoryArena:
        with self._staging_lock:
            area = self._staging.get(requester)
            if area is None:
                if len(self._staging) >= MAX_STAGING_AREAS:
                    fail(LLMStatusCode.LLM_OUT_OF_MEMORY, "cluster %d keeps %d staging areas for "
                         "other peers, its most (LLM_DATADIST_TORCH_MAX_STAGING_AREAS); retry "
                         "when one of them unlinks", self._engine.cluster_id, len(self._staging))
                area = self._staging[requester] = MemoryArena.create(
                    torch.device("cpu"), STAGING_BYTES, tag=f"{self._engine.cluster_id}.staging")
        self._announce(area, added=True)  # also when the agent started after the area
        return area

    def resolve(self, request: Resolve, exported: Set[int],
                releasable: Dict[tuple, None]) -> Resolved:
        """The checked answer to `request`; its cache id goes into `exported` (the requesting
        link's) in the same step, so the cache cannot go away without that peer being told,
        and a request key it may release into `releasable` (the link's too)."""
        # Under the table lock: the answer (regions, fence) is one snapshot of a live cache.
        with self._engine.operation(), self._engine.table.lock:
            entry, slot, binding = self._lookup(request)
            raise_if_false(entry.remote_accessible,
                           "cache %d was not registered for remote access", entry.cache_id)
            if request.placement == Placement.HOST and entry.placement == Placement.HOST:
                fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "host-to-host transfers are not supported")
            mine, theirs = entry.geometry, request.geometry
            pulling = request.direction == "pull"
            src, dst = (mine, theirs) if pulling else (theirs, mine)
            src_slot, dst_slot = (slot, request.requester_slot) if pulling else (request.requester_slot, slot)
            build_plan(request.op, src, dst, src_slot, dst_slot, request.nbytes, request.src_blocks,
                       request.dst_blocks, request.src_tensors, request.dst_tensors)  # checks only
            # Every tensor, not only the planned ones: a requester may keep this answer for
            # later requests on the same cache (it is told when the cache goes away).
            regions = entry.regions()
            release_key = None
            if pulling and binding is not None and binding.releasable:
                release_key = self._engine.table.identity_of(binding)
                while len(releasable) >= MAX_RELEASABLE:  # a peer that never releases
                    del releasable[next(iter(releasable))]
                releasable[(tuple(release_key), entry.cache_id)] = None
            exported.add(entry.cache_id)
            # Only an answer to a pull by cache id is kept for other slots (ops/remote_ops.py).
            keyed_slots = (self._engine.table.keyed_slots(entry)
                           if request.key_kind == "id_index" else [])
            return Resolved(cache_id=entry.cache_id, geometry=mine, fence=self._fence(entry),
                            placement=int(entry.placement), slot=slot, regions=regions,
                            release_key=release_key, keyed_slots=keyed_slots)

    def locate(self, request: Locate, exported: Set[int]) -> Located:
        """Find the remote-accessible cache tensor that holds each requested address range; a
        range that is not wholly inside one is refused (raw addresses are never trusted)."""
        with self._engine.operation(), self._engine.table.lock:
            # Tensors by start address: each range is looked up with a bisection (a layer-wise
            # push locates two addresses per layer of a model at once).
            tensors = sorted(((raw.data_ptr(), raw.numel(), entry, index)
                              for entry in self._engine.table.entries() if entry.remote_accessible
                              for index, raw in enumerate(entry.raw)), key=lambda t: t[0])
            starts = [t[0] for t in tensors]
            places = []
            for address in request.addresses:
                start, entry, index = self._holder(tensors, starts, address, request.nbytes)
                places.append(Place(cache_id=entry.cache_id, tensor=index, offset=address - start,
                                    region=entry.regions()[index], fence=self._fence(entry)))
                exported.add(entry.cache_id)
            return Located(places=places)

    def _holder(self, tensors, starts, address: int, nbytes: int) -> Tuple[int, CacheEntry, int]:
        """(start, entry, tensor index) of a tensor holding [address, +nbytes): the one that
        starts last at or before `address`, unless registrations overlap."""
        at = bisect.bisect_right(starts, address) - 1
        while at >= 0:
            start, size, entry, index = tensors[at]
            if address + nbytes <= start + size:
                return start, entry, index
            at -= 1
        fail(LLMStatusCode.LLM_PARAM_INVALID, "no cache of cluster %d registered for remote "
             "access holds [0x%x, +%d bytes)", self._engine.cluster_id, address, nbytes)

    @staticmethod
    def _fence(entry: CacheEntry) -> Fence:
        """(Table lock held.)"""
        if entry.fence is None:
            fail(NOT_EXIST, "cache %d does not exist", entry.cache_id)
        offset, value = entry.fence
        return Fence(fence_table().region, offset, value)

    def release(self, notices: Sequence[Pulled], releasable: Dict[tuple, None]) -> None:
        """The peer finished pulling these tensors through request keys. Only keys it was
        answered about count (`releasable`, its link's): no peer releases another's. A notice
        about a binding that is gone (released, removed, or the key now bound to another
        cache) is one delivered twice or late: it changes nothing."""
        if not notices:
            return
        table = self._engine.table
        with self._engine.operation(), table.lock:
            for notice in notices:
                mine = (tuple(notice.key), notice.cache_id)
                if mine not in releasable:
                    continue
                binding = table.binding(mine[0])
                if binding is None or binding.entry.cache_id != notice.cache_id:
                    del releasable[mine]  # released, removed or rebound meanwhile
                    continue
                table.mark_pulled(binding, notice.tensors)
                if table.binding(mine[0]) is not binding:
                    del releasable[mine]  # that was the last of its tensors

    def _lookup(self, request: Resolve) -> Tuple[CacheEntry, int, Optional[KeyBinding]]:
        table = self._engine.table
        if request.key_kind == "blocks":
            binding = table.binding(blocks_key_identity(request.model_id))
            if binding is None:
                fail(NOT_EXIST, "no blocks cache is bound to model_id %d", request.model_id)
            raise_if_false(binding.entry.is_blocks, "model_id %d names a contiguous cache",
                           request.model_id)
            return binding.entry, 0, None
        if request.key_kind == "cache_key":
            if request.prefix_id != INVALID_ID:
                identity = ("prefix", request.prefix_id, request.model_id)
            else:
                identity = ("req", request.req_id, request.model_id)
            binding = table.binding(identity)
            if binding is None:
                fail(NOT_EXIST, "cache key %s is not bound (never, or already pulled / removed)",
                     identity)
            raise_if_false(not binding.entry.is_blocks, "cache key %s names a blocks cache", identity)
            return binding.entry, binding.slot, binding
        entry = table.lookup_by_id(request.cache_id)
        if entry is None:
            fail(NOT_EXIST, "cache %d does not exist", request.cache_id)
        if entry.is_blocks:
            raise_if_false(request.batch_index == 0, "batch_index must be 0 for a blocks cache")
            return entry, 0, None
        if request.batch_index >= entry.slots:
            fail(NOT_EXIST, "cache %d has no batch index %d", request.cache_id, request.batch_index)
        binding = table.binding_of_slot(entry, request.batch_index)
        if binding is None and not entry.handle_valid:
            fail(NOT_EXIST, "cache %d was deallocated", request.cache_id)
        return entry, request.batch_index, binding


def _region_of(area: MemoryArena) -> Region:
    return Region(area.tensor.data_ptr(), area.nbytes, "cpu",
                  os.path.basename(area.shm_path or ""))
