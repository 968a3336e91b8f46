"""One link with a peer cluster: how to reach its control server, how to move bytes to and
from it, and what each side keeps about the other."""
from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Dict, Optional, Set, Tuple

import msgspec

from ..core.descriptors import Region
from ..core.options import force_staging
from ..memory.arena import PID_NAMESPACE, SHM_PREFIX, pid_alive
from ..status import LLMException, LLMStatusCode, fail
from ..transport import choose_transport
from ..transport.base import Peer, Transport
from ..transport.bounce import BounceBuffer
from .identity import start_time
from .messages import Message, Resolved
from .releases import ReleaseQueue
from .rpc_client import RpcClient


ALIVE_CHECK_S = 0.1
MAX_PREPARED = 256  # prepared transfers a link keeps; the oldest go first


@dataclasses.dataclass(eq=False)
class Link:
    """One linked peer: how to reach its control server and how to move bytes to and from it."""

    cluster_id: int
    peer: Peer
    rpc: Optional[RpcClient]
    forced_transport: Optional[str]
    bounce: BounceBuffer  # the engine's: local device memory a transport cannot reach
    session: bytes = b""  # the peer's token for this link: every request to the peer carries it
    start_time: Optional[int] = None  # of the peer's pid, when proven on this host (pid reuse)
    broken: bool = False
    authenticated: bool = True  # False until a peer that must authenticate has (handshake.py)
    cma_refused: bool = False  # the owner could not let us attach (transport/cma.py)
    _alive_at: float = -1.0  # when check_alive last looked at the peer's process
    last_used: float = dataclasses.field(default_factory=time.monotonic)  # a request either way
    transports: Dict[str, Transport] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # Requester side: owner answers kept for keys that need no release (see ops/remote_ops.py).
    descriptors: Dict[tuple, Resolved] = dataclasses.field(default_factory=dict)
    # Requester side: per answer (cache id, fence value), per remote tensor, the region as the
    # transports may use it and its transport: worked out once, not per call.
    routes: Dict[tuple, Dict[int, Tuple[Region, Transport]]] = dataclasses.field(
        default_factory=dict)
    # Requester side: prepared transfers (transport/prepared.py) by (cache id, fence value,
    # direction, local cache id, id of the tensor pairs), each kept with its pairs and built at
    # the first move between those caches; dropped with the answer they were built from.
    prepared: Dict[tuple, tuple] = dataclasses.field(default_factory=dict)
    # Owner side: cache ids whose answers this peer may have kept.
    exported: Set[int] = dataclasses.field(default_factory=set)
    # Owner side: (request key, cache id) this peer was answered about and may release
    # (owner.py); a notice about any other key is not its to give.
    releasable: Dict[tuple, None] = dataclasses.field(default_factory=dict)
    # Requester side: release notices (request keys pulled) not acknowledged yet.
    releases: ReleaseQueue = dataclasses.field(default_factory=ReleaseQueue)
    # Requester side: one staged transfer at a time uses the owner's staging area.
    staging_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # Requester side: transfers running on each remote cache id; an invalidation of that cache
    # is acknowledged only once they are done (the owner holds the memory until then).
    in_flight: Dict[int, int] = dataclasses.field(default_factory=dict)
    settled: threading.Condition = dataclasses.field(default_factory=threading.Condition)
    settle_waiters: int = 0  # threads in forget() waiting on `settled`
    force_staging: bool = dataclasses.field(default_factory=force_staging)

    def needs_staging(self, region: Region) -> bool:
        """Memory of another process that no transport reads directly: the owner's device
        memory, and its CPU memory outside /dev/shm once the owner refused us CMA (Yama names
        one ptracer per process)."""
        if self.peer.same_process:
            return False
        return (self.force_staging or region.device != "cpu"
                or (self.cma_refused and not region.shm_name))

    def ensure_usable(self) -> None:
        if self.broken or self.rpc is None:
            fail(LLMStatusCode.LLM_NOT_YET_LINK, "link with cluster %d is %s; unlink and link again",
                 self.cluster_id, "broken by an earlier failure" if self.broken else "one-way")

    def call(self, request: Message, timeout_s: float) -> Message:
        """A request to the peer; a same-host peer that dies meanwhile fails it at once
        (`LLM_LINK_FAILED`) instead of at the deadline."""
        self.check_alive()
        self.last_used = time.monotonic()
        try:
            return self.rpc.call(request, max(timeout_s, 0.001), alive=self._alive_check)
        except LLMException as exc:
            if exc.status_code == LLMStatusCode.LLM_TIMEOUT and getattr(exc, "sent", True):
                self.broken = True  # spec §26.26: a timed-out link must be re-linked
            raise

    def descriptor(self, key: tuple) -> Optional[Resolved]:
        return self.descriptors.get(key)  # one dict read: atomic, no lock needed

    def remember(self, key: tuple, reply: Resolved) -> None:
        with self.lock:
            self.descriptors[key] = reply

    def prepared_for(self, key: tuple, pairs) -> Optional[object]:
        """The prepared transfer kept under `key` for exactly these `pairs` (it holds them, so
        their id cannot name another tuple while it is kept)."""
        found = self.prepared.get(key)
        return found[1] if found is not None and found[0] is pairs else None

    def keep_prepared(self, key: tuple, pairs, prepared: object) -> None:
        # One built from an answer forgotten meanwhile is never found again: no later answer
        # has that fence value (and the fence check refuses its moves anyway).
        with self.lock:
            while len(self.prepared) >= MAX_PREPARED:
                del self.prepared[next(iter(self.prepared))]
            self.prepared[key] = (pairs, prepared)

    def forget(self, cache_ids, wait_s: float = 0.0) -> bool:
        """Drop kept answers about `cache_ids`; wait up to `wait_s` for transfers still running
        on them. False if some still run."""
        with self.lock:
            for key in [k for k, reply in self.descriptors.items() if reply.cache_id in cache_ids]:
                del self.descriptors[key]
            for key in [k for k in self.routes if k[0] in cache_ids]:
                del self.routes[key]
            for key in [k for k in self.prepared if k[0] in cache_ids]:
                del self.prepared[key]
        with self.settled:
            self.settle_waiters += 1
            try:
                return self.settled.wait_for(
                    lambda: not any(self.in_flight.get(c) for c in cache_ids), wait_s)
            finally:
                self.settle_waiters -= 1

    def using(self, cache_id: int) -> "_Using":
        """`with link.using(cache_id):` marks a transfer on the owner's cache `cache_id` as
        running (see `forget`)."""
        return _Using(self, cache_id)

    def check_alive(self) -> None:
        """A same-host peer that died (or whose pid now names another process) fails the next
        one-sided copy at once, with no round trip: its pid is looked up every time, its start
        time (pid reuse) once per `ALIVE_CHECK_S` at most."""
        self.ensure_usable()
        if not self.peer.same_host or self.peer.same_process:
            return
        now = time.monotonic()
        if now - self._alive_at < ALIVE_CHECK_S:
            gone = not pid_alive(self.peer.pid)  # a syscall; the start time needs a file read
        else:
            self._alive_at = now
            gone = start_time(self.peer.pid) != self.start_time
        if gone:
            self.broken = True
            fail(LLMStatusCode.LLM_LINK_FAILED, "cluster %d (pid %d) is gone; link again once it "
                 "is back", self.cluster_id, self.peer.pid)

    @property
    def _alive_check(self):
        if self.peer.same_host and not self.peer.same_process:
            return self.check_alive
        return None

    def shm_allowed(self, region: Region) -> Region:
        """`region` as the transports may use it: a /dev/shm file only if it is one of the peer's
        own (named for its proven pid in our pid namespace), else without the file."""
        if region.shm_name and not region.shm_name.startswith(self.shm_prefix):
            return msgspec.structs.replace(region, shm_name="", shm_offset=0)
        return region

    @property
    def shm_prefix(self) -> str:
        return f"{SHM_PREFIX}.{self.peer.pid}.{PID_NAMESPACE}." if self.peer.same_host else "\0"

    def route(self, key: tuple, index: int, region: Region) -> Tuple[Region, Transport]:
        """`region` (tensor `index` of the answer `key`) as the transports may use it, and its
        transport; worked out at the first use of the answer."""
        routes = self.routes.get(key)
        found = routes.get(index) if routes is not None else None
        if found is None:
            allowed = self.shm_allowed(region)
            found = (allowed, self.transport_for(allowed))
            with self.lock:
                self.routes.setdefault(key, {})[index] = found
        return found

    def transport_for(self, region: Region) -> Transport:
        """The transport for `region` (already passed through `shm_allowed`)."""
        cls = choose_transport(self.peer, region, self.forced_transport)
        with self.lock:
            transport = self.transports.get(cls.name)
            if transport is None:
                transport = self.transports[cls.name] = cls(self.peer)
            return transport

    def close(self) -> None:
        with self.lock:
            transports, self.transports = list(self.transports.values()), {}
            self.routes.clear()
            self.prepared.clear()
        for transport in transports:
            transport.close()
        if self.rpc is not None:
            self.rpc.close()


class _Using:
    """(A class, not a generator: every transfer enters one.)"""

    __slots__ = ("_link", "_cache_id")

    def __init__(self, link: Link, cache_id: int):
        self._link, self._cache_id = link, cache_id

    def __enter__(self) -> None:
        in_flight = self._link.in_flight
        with self._link.settled:
            in_flight[self._cache_id] = in_flight.get(self._cache_id, 0) + 1

    def __exit__(self, *exc) -> None:
        in_flight, cache_id = self._link.in_flight, self._cache_id
        with self._link.settled:
            left = in_flight[cache_id] - 1
            if left:
                in_flight[cache_id] = left
            else:
                del in_flight[cache_id]
            if self._link.settle_waiters:
                self._link.settled.notify_all()


def endpoint(ip: str, port: int) -> str:
    return f"tcp://{ip}:{port}"


def host_of(address: str) -> str:
    """"tcp://ip:port" -> "ip" ("" if it has no host part)."""
    return address.split("://", 1)[-1].rsplit(":", 1)[0] if address else ""


def specific(ip: Optional[str]) -> bool:
    return bool(ip) and ip not in ("0.0.0.0", "*", "::")


def route_ip(peer_host: str) -> str:
    """The local address the kernel would use to reach `peer_host` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((peer_host, 9))
            return sock.getsockname()[0]
    except OSError:
        return "127.0.0.1"
