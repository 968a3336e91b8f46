"""Links between clusters: the control-plane server, the handshake and the link table.

Every initialized v2 `LLMDataDist` runs one `RpcServer`. A server (`listen_ip_info`) binds it
to its listen endpoint; a client binds it to an ephemeral port on its local IP at its first
`link_clusters`, and sends that endpoint in the handshake so the peer can call back: links are
bidirectional, either side may pull or push. Data never goes through this channel.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from typing import Dict, List, Optional, Tuple

from ..configs import LLMClusterInfo, ip_int_to_str
from ..core.engine import Engine
from ..status import LLMException, LLMStatusCode, fail
from ..transport.base import Peer
from ..transport.bounce import BounceBuffer
from .host import local_host_id
from .invalidation import Invalidator
from .link import Link, endpoint, host_of, route_ip, specific
from .messages import (Ack, Hello, HelloReply, Invalidate, Locate, Message, MooncakeEndpoint,
                       Ping, Pong, Release, Resolve, StageArea, Staged, StageRead, StageWrite,
                       Unlink)
from .owner import Responder
from .rpc_client import RpcClient
from .rpc_server import RpcServer

logger = logging.getLogger(__name__)

SUCCESS = LLMStatusCode.LLM_SUCCESS
MAX_CLUSTERS_PER_CALL = 16


class LinkManager:
    def __init__(self, engine: Engine):
        self._engine = engine
        self._responder = Responder(engine)
        self.bounce = BounceBuffer(engine)
        self._lock = threading.RLock()  # the link table; request handlers take it
        # Endpoint changes wait for the serving thread, so they must never hold `_lock`: the
        # serving thread may itself be waiting for `_lock` in a handler.
        self._endpoints_lock = threading.Lock()
        self._links: Dict[int, Link] = {}
        self._server = RpcServer(self._handle, name=f"llm_datadist_torch-{engine.cluster_id}")
        self._listen: Optional[str] = None    # public endpoint (listen_ip_info)
        self._callback: Optional[str] = None  # ephemeral endpoint of a client
        self._host_id = local_host_id()
        self._agent = None  # this engine's Mooncake agent, started by the first link needing it
        self._agent_lock = threading.Lock()
        self._handlers = {  # the owner side of every request a peer may send
            Hello: self._accept, Resolve: self._on_resolve, Invalidate: self._on_invalidate,
            StageArea: self._on_stage_area, StageRead: self._on_stage, StageWrite: self._on_stage,
            Locate: self._on_locate, Release: self._on_release, Unlink: self._on_unlink,
            MooncakeEndpoint: self._on_mooncake_endpoint, Ping: lambda _request: Pong(),
        }
        self._server.start()
        self._invalidator = Invalidator(engine, self._all_links)
        if engine.options.listen is not None:
            self.listen(*engine.options.listen)

    # ---- identity and endpoints ------------------------------------------------------------
    @property
    def reply_endpoint(self) -> str:
        return self._listen or self._callback or ""

    def _identity(self) -> dict:
        agent = self._agent
        return dict(cluster_id=self._engine.cluster_id, host_id=self._host_id, pid=os.getpid(),
                    mooncake_endpoint=agent.endpoint if agent else "",
                    mooncake_required=self._mooncake_forced())

    # ---- Mooncake (cross-host data plane) --------------------------------------------------
    def _mooncake_forced(self) -> bool:
        return self._engine.options.transfer_backend == "mooncake"

    def _needs_mooncake(self, their) -> bool:
        """A link needs agents on both ends if either side forces mooncake or the hosts differ."""
        return (self._mooncake_forced() or their.mooncake_required
                or their.host_id != self._host_id)

    def _start_mooncake(self, peer_host: str, local_ip: Optional[str] = None):
        """This engine's Mooncake agent, started on first use; `LLM_FEATURE_NOT_ENABLED` if
        Mooncake is not installed. It is reached at the listen IP, else at the local IP given to
        link_clusters, else at the address that routes to the peer."""
        with self._agent_lock:
            if self._agent is None:
                from ..transport.mooncake.agent import MooncakeAgent
                ip = host_of(self._listen or "")
                if not specific(ip):
                    # A loopback local IP cannot be reached from a peer that is not local.
                    usable = specific(local_ip) and not (
                        local_ip.startswith("127.") and not peer_host.startswith("127."))
                    ip = local_ip if usable else route_ip(peer_host or "127.0.0.1")
                self._agent = MooncakeAgent(self._engine, ip)
            return self._agent

    def _hello(self, peer_host: str, local_ip: Optional[str] = None) -> Hello:
        if self._mooncake_forced():
            self._start_mooncake(peer_host, local_ip)  # so the server learns our endpoint now
        return Hello(reply_endpoint=self.reply_endpoint, **self._identity())

    def _complete(self, rpc: RpcClient, hello: Hello, reply: HelloReply, peer_host: str,
                  local_ip: Optional[str], deadline: float) -> Link:
        """Client side of an accepted handshake: start our agent if the link needs one and the
        server does not know it yet (then tell it), and build the link."""
        if self._needs_mooncake(reply) and not hello.mooncake_endpoint:
            try:
                agent = self._start_mooncake(peer_host, local_ip)
                rpc.call(MooncakeEndpoint(requester=self._engine.cluster_id,
                                          endpoint=agent.endpoint),
                         max(deadline - time.monotonic(), 0.001))
            except LLMException:
                try:  # the server already holds a link with us: drop it (best effort)
                    rpc.call(Unlink(requester=self._engine.cluster_id), 0.5)
                except LLMException:
                    pass
                raise
        return Link(reply.cluster_id, self._peer(reply), rpc, self._engine.options.transfer_backend,
                    self.bounce)

    def listen(self, ip: str, port: int) -> None:
        """Serve on ip:port (replacing an earlier listen endpoint on another port)."""
        with self._endpoints_lock:
            wanted = endpoint(ip, port)
            if self._listen is not None:
                if self._listen.rsplit(":", 1)[1] == str(port):
                    return
                self._server.unbind(self._listen)
                self._listen = None
            self._listen = self._server.bind(wanted)
            logger.info("cluster %d listens on %s", self._engine.cluster_id, self._listen)

    def bind_extra(self, address: str) -> str:
        """Also serve on `address` (a rank endpoint of a `link()` domain); no-op if bound."""
        with self._endpoints_lock:
            if address in self._server.endpoints:
                return address
            return self._server.bind(address)

    def unbind_extra(self, address: str) -> None:
        with self._endpoints_lock:
            if address in self._server.endpoints and address not in (self._listen, self._callback):
                self._server.unbind(address)

    def connect(self, address: str, timeout_s: float) -> LLMStatusCode:
        """Handshake with the server at `address` and keep the link (used by `link()`)."""
        deadline = time.monotonic() + timeout_s
        try:
            hello = self._hello(host_of(address))
        except LLMException as exc:
            return exc.status_code
        rpc = RpcClient(address)
        try:
            reply = rpc.call(hello, timeout_s)
        except LLMException:
            rpc.close()
            return LLMStatusCode.LLM_LINK_FAILED
        if not isinstance(reply, HelloReply) or not reply.accepted:
            rpc.close()
            return LLMStatusCode.LLM_LINK_FAILED
        try:
            link = self._complete(rpc, hello, reply, host_of(address), None, deadline)
        except LLMException as exc:
            rpc.close()
            return exc.status_code
        self._add(link)
        return SUCCESS

    def drop(self, cluster_id: int, notify_timeout_s: float = 0.0) -> None:
        """Drop a link; with a timeout, tell the peer first (best effort)."""
        with self._lock:
            link = self._links.get(cluster_id)
        if link is not None and notify_timeout_s > 0 and link.rpc is not None:
            try:
                link.rpc.call(Unlink(requester=self._engine.cluster_id), notify_timeout_s)
            except LLMException as exc:
                logger.warning("could not tell cluster %d about the unlink: %s", cluster_id, exc)
        self._drop(cluster_id)

    def stop_listening(self) -> None:
        with self._endpoints_lock:
            if self._listen is not None:
                self._server.unbind(self._listen)
                self._listen = None

    @property
    def listening(self) -> Optional[str]:
        return self._listen

    def _ensure_callback(self, local_ip: str) -> None:
        with self._endpoints_lock:
            if self._listen is None and self._callback is None:
                self._callback = self._server.bind(endpoint(local_ip, 0))

    # ---- link table ------------------------------------------------------------------------
    def get(self, cluster_id: int) -> Link:
        with self._lock:
            link = self._links.get(cluster_id)
        if link is None:
            fail(LLMStatusCode.LLM_NOT_YET_LINK, "cluster %d is not linked with cluster %d",
                 self._engine.cluster_id, cluster_id)
        return link

    def _all_links(self) -> List[Link]:
        with self._lock:
            return list(self._links.values())

    def has_links(self) -> bool:
        with self._lock:
            return bool(self._links)

    def linked_ids(self) -> List[int]:
        with self._lock:
            return list(self._links)

    def _add(self, link: Link) -> None:
        with self._lock:
            old = self._links.pop(link.cluster_id, None)
            self._links[link.cluster_id] = link
        if old is not None:
            old.close()
        self._grant_access()

    def _drop(self, cluster_id: int) -> bool:
        with self._lock:
            link = self._links.pop(cluster_id, None)
        self._responder.drop_staging(cluster_id)
        if link is not None:
            link.close()
            self._grant_access()
        return link is not None

    def _grant_access(self) -> None:
        from ..transport.cma import grant_access
        with self._lock:
            grant_access({link.peer.pid for link in self._links.values() if not link.peer.same_process})

    # ---- client side -----------------------------------------------------------------------
    def link_clusters(self, clusters: List[LLMClusterInfo], timeout_ms: int
                      ) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        if not clusters:
            return LLMStatusCode.LLM_PARAM_INVALID, []
        if len(clusters) > MAX_CLUSTERS_PER_CALL:
            return LLMStatusCode.LLM_CLUSTER_NUM_EXCEED_LIMIT, [LLMStatusCode.LLM_CLUSTER_NUM_EXCEED_LIMIT] * len(clusters)
        deadline = time.monotonic() + timeout_ms / 1000.0
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(clusters))) as pool:
            results = list(pool.map(lambda c: self._link_one(c, deadline), clusters))
        return _overall(results), results

    def _link_one(self, cluster: LLMClusterInfo, deadline: float) -> LLMStatusCode:
        if len(cluster.remote_ip_info_list) != 1:
            return LLMStatusCode.LLM_PARAM_INVALID
        with self._lock:
            existing = self._links.get(cluster.remote_cluster_id)
        if existing is not None and not existing.broken:
            return LLMStatusCode.LLM_ALREADY_LINK
        remote_ip, remote_port = cluster.remote_ip_info_list[0]
        local_ip = ip_int_to_str(cluster.local_ip_info_list[0][0]) if cluster.local_ip_info_list else "127.0.0.1"
        try:
            self._ensure_callback(local_ip if local_ip != "0.0.0.0" else "127.0.0.1")
            rpc = RpcClient(endpoint(ip_int_to_str(remote_ip), remote_port))
        except (LLMException, ValueError, TypeError) as exc:
            logger.error("link to cluster %s failed: %s", cluster.remote_cluster_id, exc)
            return LLMStatusCode.LLM_LINK_FAILED
        peer_host = ip_int_to_str(remote_ip)
        try:
            hello = self._hello(peer_host, local_ip)
        except LLMException as exc:
            rpc.close()
            logger.error("link to cluster %s failed: %s", cluster.remote_cluster_id, exc)
            return exc.status_code
        try:
            reply = rpc.call(hello, max(deadline - time.monotonic(), 0.001))
        except LLMException as exc:
            rpc.close()
            logger.error("link to cluster %s at %s failed: %s", cluster.remote_cluster_id, rpc.endpoint, exc)
            return LLMStatusCode.LLM_LINK_FAILED
        if not isinstance(reply, HelloReply) or not reply.accepted:
            rpc.close()
            code = reply.status_code if isinstance(reply, HelloReply) else LLMStatusCode.LLM_LINK_FAILED
            logger.error("cluster %s refused the link: %s", cluster.remote_cluster_id,
                         getattr(reply, "message", reply))
            return LLMStatusCode(code)
        try:
            link = self._complete(rpc, hello, reply, peer_host, local_ip, deadline)
        except LLMException as exc:
            rpc.close()
            logger.error("link to cluster %s failed: %s", cluster.remote_cluster_id, exc)
            return exc.status_code
        self._add(link)
        logger.info("cluster %d linked with cluster %d (pid %d)", self._engine.cluster_id,
                    reply.cluster_id, reply.pid)
        return SUCCESS

    def _peer(self, hello) -> Peer:
        same_host = hello.host_id == self._host_id
        return Peer(pid=hello.pid, same_process=same_host and hello.pid == os.getpid(),
                    same_host=same_host, mooncake_endpoint=hello.mooncake_endpoint,
                    mooncake_agent=self._agent)

    def unlink_clusters(self, clusters: List[LLMClusterInfo], timeout_ms: int,
                        force: bool) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        if not clusters:
            return LLMStatusCode.LLM_PARAM_INVALID, []
        deadline = time.monotonic() + timeout_ms / 1000.0
        results = [self._unlink_one(cluster, deadline, force) for cluster in clusters]
        return _overall(results), results

    def _unlink_one(self, cluster: LLMClusterInfo, deadline: float, force: bool) -> LLMStatusCode:
        if force:
            self._drop(cluster.remote_cluster_id)
            return SUCCESS
        if len(cluster.remote_ip_info_list) != 1:
            return LLMStatusCode.LLM_PARAM_INVALID
        with self._lock:
            link = self._links.get(cluster.remote_cluster_id)
        if link is None:
            return SUCCESS  # unlinking a missing link succeeds in v2
        try:
            link.rpc.call(Unlink(requester=self._engine.cluster_id), max(deadline - time.monotonic(), 0.001))
        except LLMException as exc:
            logger.error("unlink from cluster %d failed: %s", cluster.remote_cluster_id, exc)
            return LLMStatusCode.LLM_UNLINK_FAILED
        self._drop(cluster.remote_cluster_id)
        return SUCCESS

    # ---- server side -----------------------------------------------------------------------
    def _handle(self, request: Message, _peer_identity: bytes) -> Message:
        handler = self._handlers.get(type(request))
        if handler is None:
            fail(LLMStatusCode.LLM_PARAM_INVALID, "unexpected request %s", type(request).__name__)
        return handler(request)

    def _on_resolve(self, request: Resolve) -> Message:
        link = self.get(request.requester)  # only linked peers may ask for memory locations
        reply = self._responder.resolve(request)
        if reply.release_key is None:
            with link.lock:
                link.exported.add(reply.cache_id)
        return reply

    def _on_invalidate(self, request: Invalidate) -> Message:
        with self._lock:
            link = self._links.get(request.owner)
        if link is not None:
            link.forget(set(request.cache_ids))
        return Ack()

    def _on_stage_area(self, request: StageArea) -> Message:
        self.get(request.requester)
        return Staged(region=self._responder.staging_area(request.requester))

    def _on_stage(self, request: StageRead) -> Message:
        self.get(request.requester)
        return Staged(region=self._responder.stage(request, type(request) is StageRead))

    def _on_locate(self, request: Locate) -> Message:
        self.get(request.requester)
        return self._responder.locate(request)

    def _on_release(self, request: Release) -> Message:
        self.get(request.requester)
        self._responder.release(request)
        return Ack()

    def _on_unlink(self, request: Unlink) -> Message:
        self._drop(request.requester)
        return Ack()

    def _on_mooncake_endpoint(self, request: MooncakeEndpoint) -> Message:
        link = self.get(request.requester)
        with link.lock:
            link.peer = dataclasses.replace(link.peer, mooncake_endpoint=request.endpoint,
                                            mooncake_agent=self._agent)
            stale = link.transports.pop("mooncake", None)
        if stale is not None:
            stale.close()
        return Ack()

    def _accept(self, hello: Hello) -> HelloReply:
        identity = self._identity()
        if hello.cluster_id == self._engine.cluster_id:
            return HelloReply(accepted=False, status_code=int(LLMStatusCode.LLM_PARAM_INVALID),
                              message="a cluster cannot link with its own cluster_id", **identity)
        if self._needs_mooncake(hello):
            try:
                self._start_mooncake(host_of(hello.reply_endpoint))
            except LLMException as exc:
                return HelloReply(accepted=False, status_code=int(exc.status_code),
                                  message=str(exc), **identity)
            identity = self._identity()  # now with our endpoint
        # A client that links again (e.g. after a restart) replaces whatever we still hold.
        rpc = RpcClient(hello.reply_endpoint) if hello.reply_endpoint else None
        self._add(Link(hello.cluster_id, self._peer(hello), rpc,
                       self._engine.options.transfer_backend, self.bounce))
        logger.info("cluster %d accepted a link from cluster %d (pid %d)", self._engine.cluster_id,
                    hello.cluster_id, hello.pid)
        return HelloReply(accepted=True, status_code=int(SUCCESS), **identity)

    # ---- shutdown --------------------------------------------------------------------------
    def close(self) -> None:
        self._invalidator.close()
        self._server.close()
        self._responder.close()
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
        self._grant_access()
        with self._agent_lock:
            agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()
        self.bounce.close()


def _overall(results: List[LLMStatusCode]) -> LLMStatusCode:
    """SUCCESS only if every cluster succeeded, else the last failing code in input order."""
    failing = [code for code in results if code != SUCCESS]
    return failing[-1] if failing else SUCCESS
