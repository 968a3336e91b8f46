"""Moves that take a detour through host memory: memory of another process that no transport
reaches directly (its device memory) goes through the owner's staging area; local device memory
that a transport cannot reach goes through this engine's bounce buffer."""
from __future__ import annotations

import time
from typing import Sequence

from ..control.links import Link
from ..control.messages import STAGING_BYTES, StageArea, StageRead, StageWrite
from ..core.cache_table import CacheEntry
from ..core.engine import Engine
from ..core.plan import Plan
from ..memory.chunks import pack, split_segments
from ..status import LLMException, LLMStatusCode, fail
from ..transport.base import TransferItem, Transport


def staged_move(engine: Engine, link: Link, cache_id: int, fence: int, plan: Plan,
                local: CacheEntry, pulling: bool, deadline: float) -> int:
    """Move a plan through the owner's host staging area, chunk by chunk: the owner copies its
    (device) memory to or from the area, and the area is read or written like any host memory.

    Every chunk holds the same segments of each planned tensor, packed tensor by tensor, so a
    segment may use at most 1/len(pairs) of the area; longer ones are split. The owner checks
    each chunk against the cache's `fence` value (the cache may have gone away since)."""
    remote_tensors = [pair[0] if pulling else pair[1] for pair in plan.pairs]
    local_tensors = [pair[1] if pulling else pair[0] for pair in plan.pairs]
    per_tensor = STAGING_BYTES // len(plan.pairs)
    if per_tensor == 0:
        fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "%d tensors do not fit the %d byte staging "
             "area of cluster %d", len(plan.pairs), STAGING_BYTES, link.cluster_id)
    src_offsets, dst_offsets, lengths = plan.tensors()
    lengths, (remote_offsets, local_offsets) = split_segments(
        lengths, per_tensor, *((src_offsets, dst_offsets) if pulling
                               else (dst_offsets, src_offsets)))
    moved = 0
    with link.staging_lock, engine.table.pinned([] if pulling else [local], [local] if pulling else []):
        area = None
        for ((_, part, packed),) in pack([lengths], per_tensor):
            chunk_lengths = lengths[part]
            chunk_bytes = int(chunk_lengths.sum())
            message = dict(session=link.session, cache_id=cache_id, fence=fence,
                           tensors=remote_tensors, offsets=remote_offsets[part].tolist(),
                           lengths=chunk_lengths.tolist())
            if pulling:
                area = link.call(StageRead(**message), deadline - time.monotonic()).region
            elif area is None:
                area = link.call(StageArea(session=link.session),
                                 deadline - time.monotonic()).region
            area = link.shm_allowed(area)
            items = [TransferItem(area, packed + k * chunk_bytes, local.raw[t], local_offsets[part],
                                  chunk_lengths) for k, t in enumerate(local_tensors)]
            moved += through(engine, link, link.transport_for(area), items, local, pulling,
                             deadline)
            if not pulling:
                link.call(StageWrite(**message), deadline - time.monotonic())
    return moved


def through(engine: Engine, link: Link, transport: Transport, items: Sequence[TransferItem],
            local: CacheEntry, pulling: bool, deadline: float) -> int:
    """One transport call, with local device memory the transport cannot reach (or, under the
    staging test switch, any local memory of a cross-process link) bounced through host memory.

    A copy the transport gave up on while it still runs (a Mooncake timeout) keeps `local`'s
    memory until it ends, and breaks the link (spec §26.26: it must be linked again)."""
    remaining = deadline - time.monotonic()
    forced = link.force_staging and not link.peer.same_process
    try:
        if forced or (not transport.moves_local_device_memory
                      and any(item.local.device.type != "cpu" for item in items)):
            return link.bounce.move(transport, items, pulling, deadline)
        return transport.read(items, remaining) if pulling else transport.write(items, remaining)
    except LLMException as exc:
        in_flight = getattr(exc, "in_flight", None)
        if in_flight is not None:
            link.broken = True
            in_flight.add_done_callback(engine.table.hold([local]))
        raise
