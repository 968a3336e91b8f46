"""What this engine's control server answers: every request is served as the link whose
handshake issued the session token it carries, whatever else it says; a request without a
known session gets `LLM_NOT_YET_LINK` and touches nothing."""
from __future__ import annotations

import concurrent.futures
import time
from typing import TYPE_CHECKING, Callable

from ..status import LLMStatusCode, fail
from .link import Link
from .messages import (Ack, Hello, Invalidate, Locate, Message, MooncakeEndpoint, Ping, Pong,
                       Proof, Release, Resolve, StageArea, Staged, StageRead, StageWrite, Unlink)
from .owner import Responder

# How long an invalidation waits for this side's transfers on the caches it names (the owner
# waits a little longer for the answer: invalidation.py).
INVALIDATE_WAIT_S = 4.0
# Slow requests (staging copies with a device synchronize, a handshake that starts Mooncake)
# run on a small pool, so the serving thread only answers; each link may have this many there.
OFFLOAD_THREADS = 2
MAX_OFFLOADED_PER_LINK = 2

if TYPE_CHECKING:
    from .links import LinkManager


class Serving:
    """The dispatch table from request type to handler; runs on the server thread."""

    def __init__(self, links: "LinkManager", responder: Responder):
        self._links = links
        self._responder = responder
        self._handlers = {
            Resolve: self._resolve, Invalidate: self._invalidate, StageArea: self._stage_area,
            StageRead: self._stage, StageWrite: self._stage, Locate: self._locate,
            Release: self._release, Unlink: self._unlink,
            MooncakeEndpoint: self._mooncake_endpoint,
        }
        self._pool = concurrent.futures.ThreadPoolExecutor(
            OFFLOAD_THREADS, thread_name_prefix="llm_datadist_torch-serve")
        self._offloaded = {}  # link -> its requests on the pool

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def handle(self, request: Message, _peer_identity: bytes) -> Message:
        if isinstance(request, Hello):
            if self._links.handshake.starts_mooncake(request):
                return self._pool.submit(self._links.handshake.accept, request)
            return self._links.handshake.accept(request)
        if isinstance(request, Proof):
            return self._links.handshake.on_proof(self._link(request, proving=True), request)
        if isinstance(request, Ping):
            if request.session:  # "do you still hold this link?"
                self._link(request)
            return Pong()
        handler = self._handlers.get(type(request))
        if handler is None:
            fail(LLMStatusCode.LLM_PARAM_INVALID, "unexpected request %s", type(request).__name__)
        link = self._link(request)
        if handler == self._stage:
            return self._offload(link, lambda: self._stage(link, request))
        return handler(link, request)

    def _offload(self, link: Link, work: Callable[[], Message]) -> "concurrent.futures.Future":
        """Run `work` on the pool; a link with `MAX_OFFLOADED_PER_LINK` requests there already
        gets LLM_FAILED (no peer can queue up work for the others to wait behind)."""
        with link.lock:
            running = self._offloaded.get(link, 0)
            if running >= MAX_OFFLOADED_PER_LINK:
                fail(LLMStatusCode.LLM_FAILED, "cluster %d has %d requests running here already; "
                     "wait for their answers", link.cluster_id, running)
            self._offloaded[link] = running + 1

        def done(_future) -> None:
            with link.lock:
                left = self._offloaded.pop(link) - 1
                if left:
                    self._offloaded[link] = left
        future = self._pool.submit(work)
        future.add_done_callback(done)
        return future

    def _link(self, request, proving: bool = False) -> Link:
        link = self._links.by_session(request.session)
        if link is None:
            fail(LLMStatusCode.LLM_NOT_YET_LINK, "%s from a peer that is not linked (unknown "
                 "session): link first", type(request).__name__)
        if not link.authenticated and not proving:
            fail(LLMStatusCode.LLM_LINK_FAILED, "%s from cluster %d, which has not authenticated "
                 "with the shared key", type(request).__name__, link.cluster_id)
        link.last_used = time.monotonic()
        return link

    def _resolve(self, link: Link, request: Resolve) -> Message:
        # First: a key released by an earlier pull is gone for this one.
        self._responder.release(request.released, link.releasable)
        return self._responder.resolve(request, link.exported, link.releasable)

    @staticmethod
    def _invalidate(link: Link, request: Invalidate) -> Message:
        if not link.forget(set(request.cache_ids), INVALIDATE_WAIT_S):
            fail(LLMStatusCode.LLM_TIMEOUT, "transfers on caches %s of cluster %d still run",
                 request.cache_ids, link.cluster_id)
        return Ack()

    def _stage_area(self, link: Link, _request: StageArea) -> Message:
        return Staged(region=self._responder.staging_area(link.cluster_id))

    def _stage(self, link: Link, request: StageRead) -> Message:
        return Staged(region=self._responder.stage(link.cluster_id, request,
                                                   type(request) is StageRead))

    def _locate(self, link: Link, request: Locate) -> Message:
        return self._responder.locate(request, link.exported)

    def _release(self, link: Link, request: Release) -> Message:
        self._responder.release(request.pulled, link.releasable)
        return Ack()

    def _unlink(self, link: Link, _request: Unlink) -> Message:
        self._links.drop_link(link)
        return Ack()

    def _mooncake_endpoint(self, link: Link, request: MooncakeEndpoint) -> Message:
        return self._links.handshake.on_mooncake_endpoint(link, request)
