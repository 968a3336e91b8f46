"""The decoder side's lease keeping: renew the leases of requests still waiting to pull, and
release, on behalf of every worker, the blocks of requests that will never pull them.

Runs in the decode engine's scheduler process, on a thread of its own, so that a slow or dead
prefill engine never stalls scheduling: calls only queue work here.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Dict, List, Optional, Tuple

from .config import LOGGER_PREFIX
from .leases import ALL_RANKS
from .side_channel import Release, Renew, RenewReply, SideChannelClient, SideChannelError

logger = logging.getLogger(LOGGER_PREFIX + __name__)

Address = Tuple[str, int]


class LeaseKeeper:
    def __init__(self, rpc_timeout_s: float, tick_s: float = 0.25):
        self._rpc_timeout_s = rpc_timeout_s
        self._tick_s = tick_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # local request id -> (peer, remote request id, token)
        self._renewing: Dict[str, Tuple[Address, str, str]] = {}
        self._interval: Dict[Address, float] = {}
        self._due: Dict[Address, float] = {}
        self._releases: List[Tuple[Address, str, str]] = []
        self._clients: Dict[Address, SideChannelClient] = {}
        self._thread: Optional[threading.Thread] = None

    def renew(self, request_id: str, peer: Address, remote_request_id: str, token: str,
              lease_s: float) -> None:
        """Keep `remote_request_id`'s lease on `peer` alive until `stop`."""
        with self._lock:
            self._renewing[request_id] = (peer, remote_request_id, token)
            interval = max(0.2, lease_s / 3)
            self._interval[peer] = min(self._interval.get(peer, interval), interval)
            self._due.setdefault(peer, time.monotonic() + self._interval[peer])
            self._start_locked()

    def stop(self, request_id: str) -> None:
        with self._lock:
            self._renewing.pop(request_id, None)

    def release_all_ranks(self, peer: Address, remote_request_id: str, token: str) -> None:
        """Tell `peer` no rank of ours will read `remote_request_id`'s blocks."""
        with self._lock:
            self._releases.append((peer, remote_request_id, token))
            self._start_locked()
        self._wake.set()

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmdd-vllm-leases",
                                            daemon=True)
            self._thread.start()

    def _client(self, peer: Address) -> SideChannelClient:
        client = self._clients.get(peer)
        if client is None:
            client = self._clients[peer] = SideChannelClient(*peer, self._rpc_timeout_s)
        return client

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._tick_s)
            self._wake.clear()
            with self._lock:
                releases, self._releases = self._releases, []
                now = time.monotonic()
                due: Dict[Address, Dict[str, str]] = {}
                for peer, remote_id, token in self._renewing.values():
                    if self._due.get(peer, 0) <= now:
                        due.setdefault(peer, {})[remote_id] = token
                for peer in due:
                    self._due[peer] = now + self._interval[peer]
                for peer in [p for p in self._due if p not in due and not self._uses(p)]:
                    self._forget_locked(peer)
            for peer, remote_id, token in releases:
                self._call(peer, Release(remote_id, token, ALL_RANKS))
            for peer, leases in due.items():
                reply = self._call(peer, Renew(leases))
                if isinstance(reply, RenewReply) and reply.unknown:
                    logger.warning("LLMDataDistConnector: prefill engine %s:%d no longer holds "
                                   "the KV of requests %s (lease expired?); their loads will fail",
                                   peer[0], peer[1], reply.unknown)

    def _uses(self, peer: Address) -> bool:
        return any(p == peer for p, _, _ in self._renewing.values())

    def _forget_locked(self, peer: Address) -> None:
        self._due.pop(peer, None)
        self._interval.pop(peer, None)
        client = self._clients.pop(peer, None)
        if client is not None:
            client.close()

    def _call(self, peer: Address, message):
        try:
            return self._client(peer).call(message)
        except (SideChannelError, OSError) as exc:
            logger.warning("LLMDataDistConnector: %s to prefill engine %s:%d failed: %s",
                           type(message).__name__, peer[0], peer[1], exc)
            return None

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for peer in list(self._clients):
                self._forget_locked(peer)
