"""The requesting side of pulls and pushes: resolve on the owner, plan, move, release.

One control round trip resolves what the peer names and checks the request there; the bytes
then move one-sidedly through the link's transport in one call for all tensors; a pull through
a request key finally queues the notice that releases the key on the owner (spec §14.3), which
goes out with the link's next request or soon after (control/releases.py).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import NoReturn, Optional, Sequence, Tuple


from ..core.cache_table import CacheEntry
from ..core.engine import Engine
from ..control.links import Link
from ..control.messages import Ping, Pulled, Resolve, Resolved
from ..core.descriptors import Fence
from ..core.plan import Plan, build_plan
from ..enums import Placement
from ..status import LLMException, LLMStatusCode, fail, raise_if_false
from ..transport.base import TransferItem
from ..transport.prepared import PreparedTransfer
from .remote_ref import RemoteRef
from .staged import staged_move, through


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
        if not reply.geometry.is_blocks and ref.batch_index >= reply.geometry.slots:
            fail(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, "cache %d of cluster %d has no batch index %d",
                 ref.cache_id, link.cluster_id, ref.batch_index)
        return reply, ref.batch_index
    notice_ids, notices = link.releases.pending()  # delivered with the request
    reply = link.call(request(notices), deadline - time.monotonic())
    link.releases.acknowledged(notice_ids)
    if not isinstance(reply, Resolved):
        fail(LLMStatusCode.LLM_FAILED, "unexpected answer %s from cluster %d", type(reply).__name__,
             link.cluster_id)
    if key is not None and reply.release_key is None:
        link.remember(key, reply)
    return reply, reply.slot


def transfer(engine: Engine, link: Link, ref: RemoteRef, local: CacheEntry, direction: str, op: str,
             *, release_keys: bool = True, **request) -> int:
    """Run one pull (`direction="pull"`) or push; returns the bytes moved. `request`: the
    keyword arguments of `resolve_request`."""
    deadline = time.monotonic() + engine.options.sync_kv_timeout_ms / 1000.0
    pulling = direction == "pull"
    reply, plan = resolve_request(engine, link, ref, local, direction, op, deadline, **request)
    moved = move(engine, link, reply.cache_id, reply.fence, reply.regions, plan, local, pulling,
                 deadline)
    _release_pulled(link, reply, plan, pulling and release_keys)
    return moved


def resolve_request(engine: Engine, link: Link, ref: RemoteRef, local: CacheEntry, direction: str,
                    op: str, deadline: float, *, local_slot: int = 0, nbytes: int = -1,
                    src_blocks: Sequence[int] = (), dst_blocks: Sequence[int] = (),
                    src_tensors: Sequence[int] = (), dst_tensors: Sequence[int] = (),
                    remote_block_bytes: int = 0) -> Tuple[Resolved, Plan]:
    """The owner's checked answer about the remote cache of a pull or push, and its plan.

    `remote_block_bytes`, when non-zero, is the block size the caller expects of the remote
    blocks cache (`transfer_cache_async`'s `dst_block_memory_size`).
    """
    pulling = direction == "pull"
    mine = local.geometry

    def request(released) -> Resolve:
        return Resolve(released=released, session=link.session, key_kind=ref.kind, req_id=ref.req_id,
                       prefix_id=ref.prefix_id, model_id=ref.model_id, cache_id=ref.cache_id,
                       batch_index=ref.batch_index, direction=direction, op=op,
                       geometry=mine, placement=int(local.placement),
                       requester_slot=local_slot, nbytes=nbytes, src_blocks=list(src_blocks),
                       dst_blocks=list(dst_blocks), src_tensors=list(src_tensors),
                       dst_tensors=list(dst_tensors))
    reply, remote_slot = _resolve(engine, link, ref, request, local, deadline)
    theirs = reply.geometry
    raise_if_false(not remote_block_bytes or (theirs.is_blocks and theirs.stride == remote_block_bytes),
                   "the remote cache has %d byte blocks, not %d", theirs.stride, remote_block_bytes)
    src, dst = (theirs, mine) if pulling else (mine, theirs)
    src_slot, dst_slot = (remote_slot, local_slot) if pulling else (local_slot, remote_slot)
    return reply, build_plan(op, src, dst, src_slot, dst_slot, nbytes, src_blocks, dst_blocks,
                             src_tensors, dst_tensors)


def move(engine: Engine, link: Link, cache_id: int, fence: Fence, regions, plan,
         local: CacheEntry, pulling: bool, deadline: float) -> int:
    """Move the bytes of `plan` between `local` and tensors of the owner's cache `cache_id`
    (`regions`: wire regions by tensor index; `fence`: its fence word); returns the bytes moved.

    One-sided through the link's transports, or through the owner's staging area when the
    requester cannot reach that memory (device memory of another process). One-sided moves
    read the cache's fence word before and after the bytes, as a seqlock: a cache that went
    away (or an owner that restarted) fails the call instead of handing back its old bytes.
    """
    first_remote = regions[plan.pairs[0][0] if pulling else plan.pairs[0][1]]
    if link.needs_staging(first_remote):
        return staged_move(engine, link, cache_id, fence.value, plan, local, pulling, deadline)
    try:
        return _one_sided(engine, link, cache_id, fence, regions, plan, local, pulling, deadline)
    except LLMException as exc:
        if not getattr(exc, "ptrace_refused", False):
            raise
        link.cma_refused = True  # from now on this owner's CPU memory goes through staging
        return staged_move(engine, link, cache_id, fence.value, plan, local, pulling, deadline)


def _one_sided(engine: Engine, link: Link, cache_id: int, fence: Fence, regions, plan,
               local: CacheEntry, pulling: bool, deadline: float) -> int:
    remote_offsets, local_offsets = ((plan.src_offsets, plan.dst_offsets) if pulling
                                     else (plan.dst_offsets, plan.src_offsets))
    with engine.table.pinned(() if pulling else (local,), (local,) if pulling else ()), \
            link.using(cache_id):
        key = (cache_id, fence.value, pulling, local.cache_id, id(plan.pairs))
        prepared = link.prepared_for(key, plan.pairs)
        if prepared is None:
            prepared = _prepare(link, cache_id, fence, regions, plan.pairs, local, pulling)
            if prepared is None:  # memory not reached by address: transfer items
                return _by_items(engine, link, cache_id, fence, regions, plan, local, pulling,
                                 deadline)
            link.keep_prepared(key, plan.pairs, prepared)
        moved = prepared.run(remote_offsets, local_offsets, plan.lengths, not pulling, deadline)
        if moved < 0:
            fence_moved(link, cache_id, deadline)
    return moved


def _prepare(link: Link, cache_id: int, fence: Fence, regions, pairs, local: CacheEntry,
             pulling: bool) -> Optional[PreparedTransfer]:
    """The prepared transfer for these caches and pairs, or None (not one transport that
    reaches all of them by address)."""
    if link.force_staging and not link.peer.same_process:
        return None  # the staging test switch: every local byte goes through the bounce buffer
    routes = [link.route((cache_id, fence.value), remote, regions[remote])
              for remote in (pair[0] if pulling else pair[1] for pair in pairs)]
    transports = {transport for _, transport in routes}
    if len(transports) != 1:
        return None
    transport = transports.pop()
    fence_region, fence_transport = link.route(FENCE_ROUTE, 0, fence.region)
    tensors = [local.raw[pair[1] if pulling else pair[0]] for pair in pairs]
    entered = []
    try:
        for used in {transport, fence_transport}:
            used.enter()
            entered.append(used)
        return PreparedTransfer.prepare(transport, [region for region, _ in routes], tensors,
                                        fence_transport, fence_region, fence)
    finally:
        for used in entered:
            used.leave()


def _by_items(engine: Engine, link: Link, cache_id: int, fence: Fence, regions, plan,
              local: CacheEntry, pulling: bool, deadline: float) -> int:
    """(Pinned, in use.) The move as transfer items, one transport call per transport."""
    src_offsets, dst_offsets, lengths = plan.tensors()
    remote_offsets, local_offsets = ((src_offsets, dst_offsets) if pulling
                                     else (dst_offsets, src_offsets))
    by_transport = defaultdict(list)
    for src_index, dst_index in plan.pairs:
        remote_index, local_index = (src_index, dst_index) if pulling else (dst_index, src_index)
        region, transport = link.route((cache_id, fence.value), remote_index,
                                       regions[remote_index])
        by_transport[transport].append(TransferItem(region, remote_offsets,
                                                    local.raw[local_index], local_offsets,
                                                    lengths))
    check_fence(link, cache_id, fence, deadline)  # nothing moves with a stale answer
    moved = 0
    for transport, items in by_transport.items():
        if deadline - time.monotonic() <= 0:
            fail(LLMStatusCode.LLM_TIMEOUT, "transfer with cluster %d exceeded %d ms",
                 link.cluster_id, engine.options.sync_kv_timeout_ms)
        moved += through(engine, link, transport, items, local, pulling, deadline)
    check_fence(link, cache_id, fence, deadline)
    return moved


FENCE_ROUTE = ("fence",)  # the owner's fence table: one region for all its caches


def check_fence(link: Link, cache_id: int, fence: Fence, deadline: float) -> None:
    """Read the owner's fence word of `cache_id` one-sidedly; anything but `fence.value` means
    what we were told about the cache no longer holds: `LLM_NOT_YET_LINK` if the owner no
    longer holds the link (it restarted or unlinked), else `LLM_KV_CACHE_NOT_EXIST`."""
    region, transport = link.route(FENCE_ROUTE, 0, fence.region)
    try:
        value = transport.read_word(region, fence.offset, max(deadline - time.monotonic(), 0.001))
    except LLMException as exc:  # unreadable: the owner (or its table) may be gone
        if exc.status_code == LLMStatusCode.LLM_TIMEOUT:
            raise
        fence_moved(link, cache_id, deadline, unreadable=exc)
    if value != fence.value:
        fence_moved(link, cache_id, deadline)


def fence_moved(link: Link, cache_id: int, deadline: float,
                unreadable: Optional[LLMException] = None) -> NoReturn:
    """The owner's fence word of `cache_id` is not what it said (or `unreadable`): forget what
    we were told about the cache and fail, saying whether the owner still holds the link."""
    link.forget({cache_id})
    try:
        link.call(Ping(session=link.session), max(min(deadline - time.monotonic(), 1.0), 0.05))
    except LLMException as exc:
        link.broken = True
        if exc.status_code == LLMStatusCode.LLM_NOT_YET_LINK:
            fail(LLMStatusCode.LLM_NOT_YET_LINK, "cluster %d no longer holds the link (it "
                 "restarted or unlinked); nothing moved with its cache %d is used: unlink and "
                 "link again", link.cluster_id, cache_id)
        fail(LLMStatusCode.LLM_LINK_FAILED, "cluster %d does not answer (%s); nothing moved with "
             "its cache %d is used: link again once it is back", link.cluster_id, exc, cache_id)
    if unreadable is not None:  # the owner is there: the read itself failed
        raise unreadable
    fail(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, "cache %d of cluster %d went away (deallocated, "
         "unregistered or rebound) during or before the transfer; nothing moved with it is used",
         cache_id, link.cluster_id)


def _release_pulled(link: Link, reply: Resolved, plan, release: bool) -> None:
    """Queue the notice that tensors were pulled through a request key (the owner releases the
    key once told; control/releases.py delivers it without making this pull wait)."""
    if release and reply.release_key is not None:
        link.releases.add(Pulled(key=list(reply.release_key), cache_id=reply.cache_id,
                                 tensors=sorted({pair[0] for pair in plan.pairs})))
