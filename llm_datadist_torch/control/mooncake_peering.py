"""This engine's Mooncake agent, seen from the links: started by the first link that needs it
(a peer on another host, or a side that forces mooncake), reached at one address."""
from __future__ import annotations

import threading
from typing import Callable, Optional

from ..core.engine import Engine
from .link import host_of, route_ip, specific


class MooncakePeering:
    def __init__(self, engine: Engine, listen_endpoint: Callable[[], Optional[str]]):
        self._engine = engine
        self._listen_endpoint = listen_endpoint
        self._agent = None
        self._lock = threading.Lock()

    @property
    def agent(self):
        """The running agent, or None."""
        return self._agent

    @property
    def endpoint(self) -> str:
        agent = self._agent
        return agent.endpoint if agent else ""

    @property
    def forced(self) -> bool:
        return self._engine.options.transfer_backend == "mooncake"

    def needed_with(self, their, host_id: str) -> bool:
        """A link needs agents on both ends if either side forces mooncake or the peer says it
        is on another host (a wrong "same host" claim is caught by the handshake's proof)."""
        return self.forced or their.mooncake_required or their.host_id != host_id

    def start(self, peer_host: str, local_ip: Optional[str] = None):
        """The agent, started on first use; `LLM_FEATURE_NOT_ENABLED` if Mooncake is not
        installed. It is reached at the listen IP, else at the local IP given to link_clusters,
        else at the address that routes to the peer."""
        with self._lock:
            if self._agent is None:
                from ..transport.mooncake.agent import MooncakeAgent
                ip = host_of(self._listen_endpoint() or "")
                if not specific(ip):
                    # A loopback local IP cannot be reached from a peer that is not local.
                    usable = specific(local_ip) and not (
                        local_ip.startswith("127.") and not peer_host.startswith("127."))
                    ip = local_ip if usable else route_ip(peer_host or "127.0.0.1")
                self._agent = MooncakeAgent(self._engine, ip)
            return self._agent

    def close(self) -> None:
        with self._lock:
            agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()
