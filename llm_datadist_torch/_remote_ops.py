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

from ._cache_table import CacheEntry
from ._engine import Engine
from ._links import Link
from ._serving import geometry_of, wire_geometry
from ._transfer_plan import Geometry, build_plan
from .control.messages import Release, Resolve, Resolved
from .enums import Placement
from .keys import INVALID_ID
from .status import LLMException, LLMStatusCode, fail
from .transport.base import MemoryRegion, TransferItem


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
             dst_tensors: Sequence[int] = (), release_keys: bool = True) -> int:
    """Run one pull (`direction="pull"`) or push; returns the bytes moved."""
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
    src, dst = (theirs, mine) if pulling else (mine, theirs)
    src_slot, dst_slot = (remote_slot, local_slot) if pulling else (local_slot, remote_slot)
    plan = build_plan(op, src, dst, src_slot, dst_slot, nbytes, src_blocks, dst_blocks, src_tensors,
                      dst_tensors)
    by_transport = defaultdict(list)
    for src_index, dst_index in plan.pairs:
        remote_index, local_index = (src_index, dst_index) if pulling else (dst_index, src_index)
        wire = reply.regions[remote_index]
        region = MemoryRegion(address=wire.address, nbytes=wire.nbytes, device=wire.device,
                              shm_name=wire.shm_name, shm_offset=wire.shm_offset)
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
                moved += transport.read(items, remaining) if pulling else transport.write(items, remaining)
            except LLMException as exc:
                in_flight = getattr(exc, "in_flight", None)  # a copy abandoned while running
                if in_flight is not None:
                    link.broken = True  # spec §26.26: a timed-out link must be re-linked
                    in_flight.add_done_callback(engine.table.hold([local]))
                raise
    if pulling and release_keys and reply.release_key is not None:
        pulled = sorted({pair[0] for pair in plan.pairs})
        link.call(Release(requester=engine.cluster_id, key=list(reply.release_key), tensors=pulled),
                  max(deadline - time.monotonic(), 0.05))
    return moved


