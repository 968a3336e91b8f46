"""Links between clusters: the control-plane server, the link table, linking and unlinking.

Every initialized `LLMDataDist` runs one `RpcServer`. A server (`listen_ip_info`) binds it to
its listen endpoint; a client binds it to an ephemeral port on its local IP at its first
`link_clusters`, and sends that endpoint in the handshake so the peer can call back: links are
bidirectional, either side may pull or push. Data never goes through this channel.

The handshake (handshake.py) gives each side a secret session token that the other puts in
every later request (serving.py serves a request as the link of its token, nothing else), and
proves "same process" and "same host" from local facts (identity.py).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from typing import Dict, List, Optional, Tuple

from ..configs import LLMClusterInfo, ip_int_to_str
from ..core.engine import Engine
from ..status import LLMException, LLMStatusCode, fail
from ..transport.bounce import BounceBuffer
from ..transport.cma import grant_access
from .handshake import Handshake
from .host import local_host_id
from .invalidation import Invalidator
from .link import Link, endpoint, host_of
from .liveness import Reaper, holds_link
from .messages import Unlink
from .mooncake_peering import MooncakePeering
from .owner import Responder
from .releases import ReleaseSender, deliver
from .rpc_server import RpcServer
from .serving import Serving

logger = logging.getLogger(__name__)

SUCCESS = LLMStatusCode.LLM_SUCCESS
MAX_CLUSTERS_PER_CALL = 16
# Links one engine holds at most: each holds a socket, so a flood of handshakes must not take
# every file descriptor of the process.
MAX_LINKS = int(os.environ.get("LLM_DATADIST_TORCH_MAX_LINKS", "256"))
# A handshake naming a cluster that is linked already asks the old peer whether it still holds
# the link (an impostor must not displace a live peer); at most once a second per cluster. At
# the cap, the longest idle link gives its place if its peer does not answer.
LIVENESS_TIMEOUT_S = 0.2
LIVENESS_INTERVAL_S = 1.0
EVICT_IDLE_S = 5.0
MAX_EVICTION_PROBES = 3
FINAL_RELEASE_TIMEOUT_S = 1.0  # finalize: for the release notices left, all links together


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
        self._sessions: Dict[bytes, Link] = {}  # tokens this side issued -> their link
        self._liveness_checked: Dict[int, float] = {}
        self.release_sender = ReleaseSender(
            self.all_links, f"llm_datadist_torch-release-{engine.cluster_id}",
            engine.options.sync_kv_timeout_ms / 1000.0)
        self._serving = Serving(self, self._responder)
        self._server = RpcServer(self._serving.handle,
                                 name=f"llm_datadist_torch-{engine.cluster_id}")
        self._listen: Optional[str] = None    # public endpoint (listen_ip_info)
        self._callback: Optional[str] = None  # ephemeral endpoint of a client
        self._host_id = local_host_id()
        self._mooncake = MooncakePeering(engine, lambda: self._listen)
        self.handshake = Handshake(self, engine, self._mooncake, self._host_id)
        self._server.start()
        self._invalidator = Invalidator(engine, self.all_links)
        self._reaper = Reaper(self, f"llm_datadist_torch-reaper-{engine.cluster_id}")
        if engine.options.listen is not None:
            try:
                self.listen(*engine.options.listen)
            except BaseException:  # e.g. the port is taken: leave no thread or socket behind
                self.close()
                raise

    # ---- identity and endpoints ------------------------------------------------------------
    @property
    def reply_endpoint(self) -> str:
        return self._listen or self._callback or ""

    @property
    def mooncake_agent(self):
        return self._mooncake.agent

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
            if self._engine.options.auth_key is None and not ip.startswith("127."):
                logger.warning("cluster %d accepts links from any host that reaches %s (no "
                               "shared key: set LLM_DATADIST_TORCH_AUTH_KEY to authenticate "
                               "them)", self._engine.cluster_id, self._listen)

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
        try:
            self.add(*self.handshake.link_to(address, host_of(address), None,
                                             time.monotonic() + timeout_s))
        except LLMException as exc:
            logger.info("link to %s failed: %s", address, exc)
            return exc.status_code
        return SUCCESS

    def drop(self, cluster_id: int, notify_timeout_s: float = 0.0) -> None:
        """Drop a link; with a timeout, tell the peer first (best effort)."""
        with self._lock:
            link = self._links.get(cluster_id)
        if link is not None and notify_timeout_s > 0 and link.rpc is not None:
            deliver(link, notify_timeout_s)
            try:
                link.rpc.call(Unlink(session=link.session), notify_timeout_s)
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

    def all_links(self) -> List[Link]:
        with self._lock:
            return list(self._links.values())

    def has_links(self) -> bool:
        with self._lock:
            return bool(self._links)

    def linked_ids(self) -> List[int]:
        with self._lock:
            return list(self._links)

    def by_session(self, token: bytes) -> Optional[Link]:
        with self._lock:
            return self._sessions.get(token)

    def add(self, link: Link, token: bytes) -> None:
        """Add `link`, reached by requests carrying `token`, replacing a link with its cluster."""
        with self._lock:
            old = self._links.pop(link.cluster_id, None)
            self._links[link.cluster_id] = link
            self._sessions[token] = link
        if old is not None:
            self._forget(old)
        self.grant_access()

    def _drop(self, cluster_id: int) -> bool:
        with self._lock:
            link = self._links.pop(cluster_id, None)
        if link is not None:
            self._forget(link)
            self.grant_access()
        return link is not None

    def drop_link(self, link: Link) -> None:
        """Drop `link` if it is still the link of its cluster (an `Unlink` from its peer)."""
        with self._lock:
            if self._links.get(link.cluster_id) is link:
                del self._links[link.cluster_id]
        self._forget(link)
        self.grant_access()

    def _forget(self, link: Link) -> None:
        """Close a link that left the table: its sessions, pending proof, staging area."""
        with self._lock:
            for token in [t for t, held in self._sessions.items() if held is link]:
                del self._sessions[token]
            still_linked = link.cluster_id in self._links
        self.handshake.forget(link)
        if not still_linked:
            self._responder.drop_staging(link.cluster_id)
            self._liveness_checked.pop(link.cluster_id, None)
        link.close()

    def grant_access(self) -> None:
        """CMA access for exactly the same-host peers this engine proved (with those of the
        process's other engines: transport/cma.py)."""
        with self._lock:
            grant_access(self, {link.peer.pid for link in self._links.values()
                                if link.peer.same_host and not link.peer.same_process})

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
        try:
            local_ip = (ip_int_to_str(cluster.local_ip_info_list[0][0])
                        if cluster.local_ip_info_list else "127.0.0.1")
            peer_host = ip_int_to_str(remote_ip)
            self._ensure_callback(local_ip if local_ip != "0.0.0.0" else "127.0.0.1")
            link, token = self.handshake.link_to(endpoint(peer_host, remote_port), peer_host,
                                                 local_ip, deadline)
            self.add(link, token)
        except LLMException as exc:
            logger.error("link to cluster %s failed: %s", cluster.remote_cluster_id, exc)
            return exc.status_code
        except (ValueError, TypeError, OSError) as exc:
            logger.error("link to cluster %s failed: %s", cluster.remote_cluster_id, exc)
            return LLMStatusCode.LLM_LINK_FAILED
        logger.info("cluster %d linked with cluster %d (pid %d)", self._engine.cluster_id,
                    link.cluster_id, link.peer.pid)
        return SUCCESS

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
        # Keys pulled: released first, with at most half the time left (the unlink goes anyway).
        if len(link.releases):
            deliver(link, max((deadline - time.monotonic()) / 2, 0.001))
        try:
            link.rpc.call(Unlink(session=link.session), max(deadline - time.monotonic(), 0.001))
        except LLMException as exc:
            logger.error("unlink from cluster %d failed: %s", cluster.remote_cluster_id, exc)
            return LLMStatusCode.LLM_UNLINK_FAILED
        self._drop(cluster.remote_cluster_id)
        return SUCCESS

    # ---- room under the link cap -------------------------------------------------------------
    def room_for(self, cluster_id: int) -> Optional[Tuple[LLMStatusCode, str]]:
        """Why a handshake from `cluster_id` cannot be taken now, or None.

        A cluster that is linked already is replaced only if the old link is broken or its
        peer no longer holds it (restarted, or unlinked on its side): a live peer is never
        displaced by someone naming its cluster id."""
        with self._lock:
            old = self._links.get(cluster_id)
            if old is None:
                if len(self._links) < MAX_LINKS:
                    return None
                by_idleness = sorted(self._links.values(), key=lambda link: link.last_used)
        if old is None:
            if self._evict_one(by_idleness):
                return None
            return (LLMStatusCode.LLM_CLUSTER_NUM_EXCEED_LIMIT,
                    f"{MAX_LINKS} links, the most one engine holds (LLM_DATADIST_TORCH_MAX_LINKS)")
        with self._lock:
            now = time.monotonic()
            recently = now - self._liveness_checked.get(cluster_id, -LIVENESS_INTERVAL_S)
            if not old.broken and old.rpc is not None and recently < LIVENESS_INTERVAL_S:
                return LLMStatusCode.LLM_ALREADY_LINK, f"cluster {cluster_id} is linked"
            self._liveness_checked[cluster_id] = now
        if not holds_link(old, LIVENESS_TIMEOUT_S):
            return None  # the old peer is gone or no longer holds the link
        return LLMStatusCode.LLM_ALREADY_LINK, f"cluster {cluster_id} is linked and alive"

    def _evict_one(self, by_idleness: List[Link]) -> bool:
        """Drop the longest idle link whose peer does not answer for it; a few probes at most
        (links without a way to reach their peer need none)."""
        probes, now = 0, time.monotonic()
        for link in by_idleness:
            if now - link.last_used <= EVICT_IDLE_S:
                return False
            if link.rpc is not None and not link.broken:
                if probes == MAX_EVICTION_PROBES:
                    return False
                probes += 1
            if not holds_link(link, LIVENESS_TIMEOUT_S):
                self.drop_link(link)
                return True
        return False

    # ---- shutdown --------------------------------------------------------------------------
    def close(self) -> None:
        self._reaper.close()
        self.release_sender.close()
        deadline = time.monotonic() + FINAL_RELEASE_TIMEOUT_S
        for link in self.all_links():  # keys pulled: told before the links go
            if len(link.releases) and time.monotonic() < deadline:
                deliver(link, deadline - time.monotonic())
        self._invalidator.close()
        self._server.close()
        self._serving.close()
        self._responder.close()
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            self._forget(link)
        self.grant_access()
        self._mooncake.close()
        self.bounce.close()


def _overall(results: List[LLMStatusCode]) -> LLMStatusCode:
    """SUCCESS only if every cluster succeeded, else the last failing code in input order."""
    failing = [code for code in results if code != SUCCESS]
    return failing[-1] if failing else SUCCESS
