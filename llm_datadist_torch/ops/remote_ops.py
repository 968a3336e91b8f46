"""The requesting side of pulls and pushes: resolve on the owner, plan, move, release.

One control round trip resolves what the peer names and checks the request there; the bytes
then move one-sidedly through the link's transport in one call for all tensors; a pull through
a request key finally tells the owner, which releases the key (spec §14.3).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Sequence, Tuple


from ..core.cache_table import CacheEntry
from ..core.engine import Engine
from ..control.links import Link
from ..control.messages import Ping, Release, Resolve, Resolved
from ..core.descriptors import Fence
from ..core.plan import build_plan
from ..enums import Placement
from ..status import LLMException, LLMStatusCode, fail, raise_if_false
from ..transport.base import TransferItem
from .remote_ref import RemoteRef
from .staged import staged_move, through

logger = logging.getLogger(__name__)


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
    mine = local.geometry

    def request() -> Resolve:
        return Resolve(session=link.session, key_kind=ref.kind, req_id=ref.req_id,
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
    plan = build_plan(op, src, dst, src_slot, dst_slot, nbytes, src_blocks, dst_blocks, src_tensors,
                      dst_tensors)
    moved = move(engine, link, reply.cache_id, reply.fence, reply.regions, plan, local, pulling,
                 deadline)
    _release_pulled(engine, link, reply, plan, pulling and release_keys, deadline)
    return moved


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
    moved = 0
    with engine.table.pinned([] if pulling else [local], [local] if pulling else []), \
            link.using(cache_id):
        by_transport = defaultdict(list)
        for src_index, dst_index in plan.pairs:
            remote_index, local_index = (src_index, dst_index) if pulling else (dst_index, src_index)
            region, transport = link.route((cache_id, fence.value), remote_index,
                                           regions[remote_index])
            by_transport[transport].append(TransferItem(region, remote_offsets,
                                                        local.raw[local_index], local_offsets,
                                                        plan.lengths))
        check_fence(link, cache_id, fence, deadline)  # nothing moves with a stale answer
        for transport, items in by_transport.items():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fail(LLMStatusCode.LLM_TIMEOUT, "transfer with cluster %d exceeded %d ms",
                     link.cluster_id, engine.options.sync_kv_timeout_ms)
            moved += through(engine, link, transport, items, local, pulling, deadline)
        check_fence(link, cache_id, fence, deadline)
    return moved


MAX_PENDING = 1024  # release notices a link keeps for later, at most
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
        unreadable = exc
    else:
        if value == fence.value:
            return
        unreadable = None
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


def _release_pulled(engine: Engine, link: Link, reply: Resolved, plan, release: bool,
                    deadline: float) -> None:
    """Tell the owner which tensors were pulled through a request key (it releases the key).

    The bytes have arrived: a notice that cannot be delivered now does not fail the pull; it
    is kept on the link (a bounded number) and sent before the link's next release."""
    if not release or reply.release_key is None:
        return
    pulled = sorted({pair[0] for pair in plan.pairs})
    with link.lock:
        notices = link.pending_releases + [
            Release(session=link.session, key=list(reply.release_key), tensors=pulled)]
        link.pending_releases = []
    for index, notice in enumerate(notices):
        try:
            link.call(notice, max(deadline - time.monotonic(), 0.05))
        except LLMException as exc:
            logger.warning("cluster %d was not told that key %s was pulled (%s); told later",
                           link.cluster_id, notice.key, exc)
            with link.lock:
                link.pending_releases = (notices[index:] + link.pending_releases)[:MAX_PENDING]
            return
