"""The requesting side of pulls and pushes: resolve on the owner, plan, move, release.

One control round trip resolves what the peer names and checks the request there; the bytes
then move one-sidedly through the link's transport in one call for all tensors; a pull through
a request key finally tells the owner, which releases the key (spec §14.3).
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from typing import Optional, Sequence, Tuple

import torch

from ._cache_table import CacheEntry
from ._engine import Engine
from ._links import Link
from ._serving import STAGING_BYTES, geometry_of, wire_geometry
from ._transfer_plan import Geometry, build_plan
from .control.messages import Release, Resolve, Resolved, StageArea, StageRead, StageWrite
from .enums import Placement
from .keys import INVALID_ID
from .status import LLMException, LLMStatusCode, fail, raise_if_false
from .transport.base import MemoryRegion, TransferItem, Transport


@dataclasses.dataclass
class RemoteRef:
    """What names the remote cache: a key of one of three kinds (spec §14.5)."""

    kind: str  # "cache_key" | "id_index" | "blocks"
    req_id: int = INVALID_ID
    prefix_id: int = INVALID_ID
    model_id: int = 0
    cache_id: int = -1
    batch_index: int = 0

    @property
    def reusable_key(self) -> Optional[tuple]:
        """Key under which the owner's answer may be kept: blocks keys and cache ids name the
        same memory until the owner says otherwise; request keys are consumed by pulls."""
        if self.kind == "cache_key":
            return None
        return (self.kind, self.model_id if self.kind == "blocks" else self.cache_id)


def link_for(engine: Engine, links, cluster_id: int, local: CacheEntry,
             remote_accessible_mode: bool) -> Link:
    """The link over which `local` is moved to or from `cluster_id` (`LLM_NOT_YET_LINK` if none)."""
    raise_if_false(cluster_id != engine.cluster_id,
                   "cannot transfer with this cluster's own cluster_id %d", cluster_id)
    if remote_accessible_mode:
        raise_if_false(local.remote_accessible, "cache %d is not registered for remote access",
                       local.cache_id)
    return links.get(cluster_id)


def _resolve(engine: Engine, link: Link, ref: RemoteRef, request, local: CacheEntry,
             deadline: float) -> Tuple[Resolved, int]:
    """The owner's answer and the remote slot: kept from an earlier request, or asked for now.

    A pull by cache id of a slot that a key is bound to always asks: the owner releases the
    key after it (spec §14.3).
    """
    key = ref.reusable_key
    reply = link.descriptor(key) if key is not None else None
    if reply is not None and (ref.kind == "blocks" or ref.batch_index not in reply.keyed_slots):
        link.check_alive()
        if reply.placement == Placement.HOST and local.placement == Placement.HOST:
            fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "host-to-host transfers are not supported")
        if ref.kind == "blocks":
            return reply, 0
        if not reply.geometry[3] and ref.batch_index >= reply.geometry[1]:
            fail(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, "cache %d of cluster %d has no batch index %d",
                 ref.cache_id, link.cluster_id, ref.batch_index)
        return reply, ref.batch_index
    reply = link.call(request(), deadline - time.monotonic())
    if not isinstance(reply, Resolved):
        fail(LLMStatusCode.LLM_FAILED, "unexpected answer %s from cluster %d", type(reply).__name__,
             link.cluster_id)
    if key is not None and reply.release_key is None:
        link.remember(key, reply)
    return reply, reply.slot


def transfer(engine: Engine, link: Link, ref: RemoteRef, local: CacheEntry, direction: str, op: str, *,
             local_slot: int = 0, nbytes: int = -1, src_blocks: Sequence[int] = (),
             dst_blocks: Sequence[int] = (), src_tensors: Sequence[int] = (),
             dst_tensors: Sequence[int] = (), release_keys: bool = True,
             remote_block_bytes: int = 0) -> int:
    """Run one pull (`direction="pull"`) or push; returns the bytes moved.

    `remote_block_bytes`, when non-zero, is the block size the caller expects of the remote
    blocks cache (`transfer_cache_async`'s `dst_block_memory_size`).
    """
    timeout_s = engine.options.sync_kv_timeout_ms / 1000.0
    deadline = time.monotonic() + timeout_s
    pulling = direction == "pull"
    mine = geometry_of(local)

    def request() -> Resolve:
        return Resolve(requester=engine.cluster_id, key_kind=ref.kind, req_id=ref.req_id,
                       prefix_id=ref.prefix_id, model_id=ref.model_id, cache_id=ref.cache_id,
                       batch_index=ref.batch_index, direction=direction, op=op,
                       geometry=wire_geometry(mine), placement=int(local.placement),
                       requester_slot=local_slot, nbytes=nbytes, src_blocks=list(src_blocks),
                       dst_blocks=list(dst_blocks), src_tensors=list(src_tensors),
                       dst_tensors=list(dst_tensors))
    reply, remote_slot = _resolve(engine, link, ref, request, local, deadline)
    theirs = Geometry(*reply.geometry[:3], bool(reply.geometry[3]))
    raise_if_false(not remote_block_bytes or (theirs.is_blocks and theirs.stride == remote_block_bytes),
                   "the remote cache has %d byte blocks, not %d", theirs.stride, remote_block_bytes)
    src, dst = (theirs, mine) if pulling else (mine, theirs)
    src_slot, dst_slot = (remote_slot, local_slot) if pulling else (local_slot, remote_slot)
    plan = build_plan(op, src, dst, src_slot, dst_slot, nbytes, src_blocks, dst_blocks, src_tensors,
                      dst_tensors)
    moved = move(engine, link, reply.cache_id, reply.regions, plan, local, pulling, deadline)
    _release_pulled(engine, link, reply, plan, pulling and release_keys, deadline)
    return moved


def move(engine: Engine, link: Link, cache_id: int, regions, plan, local: CacheEntry, pulling: bool,
         deadline: float) -> int:
    """Move the bytes of `plan` between `local` and tensors of the owner's cache `cache_id`
    (`regions`: wire regions by tensor index); returns the bytes moved.

    One-sided through the link's transports, or through the owner's staging area when the
    requester cannot reach that memory (device memory of another process).
    """
    first_remote = regions[plan.pairs[0][0] if pulling else plan.pairs[0][1]]
    if link.needs_staging(_region(first_remote)):
        return _staged(engine, link, cache_id, plan, local, pulling, deadline)
    by_transport = defaultdict(list)
    for src_index, dst_index in plan.pairs:
        remote_index, local_index = (src_index, dst_index) if pulling else (dst_index, src_index)
        region = _region(regions[remote_index])
        remote_offsets, local_offsets = ((plan.src_offsets, plan.dst_offsets) if pulling
                                         else (plan.dst_offsets, plan.src_offsets))
        item = TransferItem(region, remote_offsets, local.raw[local_index], local_offsets, plan.lengths)
        by_transport[link.transport_for(region)].append(item)
    moved = 0
    with engine.table.pinned([] if pulling else [local], [local] if pulling else []):
        for transport, items in by_transport.items():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fail(LLMStatusCode.LLM_TIMEOUT, "transfer with cluster %d exceeded %d ms",
                     link.cluster_id, engine.options.sync_kv_timeout_ms)
            try:
                moved += _through(engine, link, transport, items, pulling, deadline)
            except LLMException as exc:
                in_flight = getattr(exc, "in_flight", None)  # a copy abandoned while running
                if in_flight is not None:
                    link.broken = True  # spec §26.26: a timed-out link must be re-linked
                    in_flight.add_done_callback(engine.table.hold([local]))
                raise
    return moved


def _through(engine: Engine, link: Link, transport: Transport, items, pulling: bool,
             deadline: float) -> int:
    """One transport call, with local device memory the transport cannot reach (or, under the
    staging test switch, any local memory of a cross-process link) bounced through host memory."""
    remaining = deadline - time.monotonic()
    forced = link.force_staging and not link.peer.same_process
    if forced or (not transport.moves_local_device_memory
                  and any(item.local.device.type != "cpu" for item in items)):
        return engine.bounce.move(transport, items, pulling, deadline)
    return transport.read(items, remaining) if pulling else transport.write(items, remaining)


def _region(wire) -> MemoryRegion:
    return MemoryRegion(address=wire.address, nbytes=wire.nbytes, device=wire.device,
                        shm_name=wire.shm_name, shm_offset=wire.shm_offset)


def _release_pulled(engine: Engine, link: Link, reply: Resolved, plan, release: bool,
                    deadline: float) -> None:
    """Tell the owner which tensors were pulled through a request key (it releases the key)."""
    if release and reply.release_key is not None:
        pulled = sorted({pair[0] for pair in plan.pairs})
        link.call(Release(requester=engine.cluster_id, key=list(reply.release_key), tensors=pulled),
                  max(deadline - time.monotonic(), 0.05))


def _staged(engine: Engine, link: Link, cache_id: int, plan, local: CacheEntry, pulling: bool,
            deadline: float) -> int:
    """Move a plan through the owner's host staging area, chunk by chunk: the owner copies its
    (device) memory to or from the area, and the area is read or written like any host memory."""
    remote_tensors = [pair[0] if pulling else pair[1] for pair in plan.pairs]
    local_tensors = [pair[1] if pulling else pair[0] for pair in plan.pairs]
    remote_offsets, local_offsets = ((plan.src_offsets, plan.dst_offsets) if pulling
                                     else (plan.dst_offsets, plan.src_offsets))
    moved = 0
    with link.staging_lock, engine.table.pinned([] if pulling else [local], [local] if pulling else []):
        area = None
        for chunk in _chunks(plan.lengths, len(plan.pairs), STAGING_BYTES):
            lengths, chunk_bytes = plan.lengths[chunk], int(plan.lengths[chunk].sum())
            packed = torch.cumsum(lengths, 0) - lengths
            message = dict(requester=engine.cluster_id, cache_id=cache_id, tensors=remote_tensors,
                           offsets=remote_offsets[chunk].tolist(), lengths=lengths.tolist())
            if pulling:
                area = link.call(StageRead(**message), deadline - time.monotonic()).region
            elif area is None:
                area = link.call(StageArea(requester=engine.cluster_id),
                                 deadline - time.monotonic()).region
            region = _region(area)
            items = [TransferItem(region, packed + k * chunk_bytes, local.raw[t], local_offsets[chunk],
                                  lengths) for k, t in enumerate(local_tensors)]
            moved += _through(engine, link, link.transport_for(region), items, pulling, deadline)
            if not pulling:
                link.call(StageWrite(**message), deadline - time.monotonic())
    return moved


def _chunks(lengths: torch.Tensor, tensors: int, capacity: int):
    """Slices of segments whose bytes, over all tensors, fit the staging area."""
    start, used = 0, 0
    for index, length in enumerate(lengths.tolist()):
        if length * tensors > capacity:
            fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "a %d byte segment of %d tensors does not "
                 "fit the %d byte staging area", length, tensors, capacity)
        if used + length * tensors > capacity:
            yield slice(start, index)
            start, used = index, 0
        used += length * tensors
    yield slice(start, len(lengths))


