"""One link with a peer cluster: how to reach its control server, how to move bytes to and
from it, and what each side keeps about the other."""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from typing import Dict, Optional, Set

import msgspec

from ..core.descriptors import Region
from ..core.options import force_staging
from ..memory.arena import PID_NAMESPACE, SHM_PREFIX
from ..status import LLMException, LLMStatusCode, fail
from ..transport import choose_transport
from ..transport.base import Peer, Transport
from ..transport.bounce import BounceBuffer
from .identity import start_time
from .messages import Message, Resolved
from .rpc_client import RpcClient


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
    last_used: float = dataclasses.field(default_factory=time.monotonic)  # a request either way
    transports: Dict[str, Transport] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # Requester side: owner answers kept for keys that need no release (see ops/remote_ops.py).
    descriptors: Dict[tuple, Resolved] = dataclasses.field(default_factory=dict)
    # Owner side: cache ids whose answers this peer may have kept.
    exported: Set[int] = dataclasses.field(default_factory=set)
    # Requester side: one staged transfer at a time uses the owner's staging area.
    staging_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # Requester side: transfers running on each remote cache id; an invalidation of that cache
    # is acknowledged only once they are done (the owner holds the memory until then).
    in_flight: Dict[int, int] = dataclasses.field(default_factory=dict)
    settled: threading.Condition = dataclasses.field(default_factory=threading.Condition)
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
        self.ensure_usable()
        self.last_used = time.monotonic()
        try:
            return self.rpc.call(request, max(timeout_s, 0.001))
        except LLMException as exc:
            if exc.status_code == LLMStatusCode.LLM_TIMEOUT and getattr(exc, "sent", True):
                self.broken = True  # spec §26.26: a timed-out link must be re-linked
            raise

    def descriptor(self, key: tuple) -> Optional[Resolved]:
        with self.lock:
            return self.descriptors.get(key)

    def remember(self, key: tuple, reply: Resolved) -> None:
        with self.lock:
            self.descriptors[key] = reply

    def forget(self, cache_ids, wait_s: float = 0.0) -> bool:
        """Drop kept answers about `cache_ids`; wait up to `wait_s` for transfers still running
        on them. False if some still run."""
        with self.lock:
            for key in [k for k, reply in self.descriptors.items() if reply.cache_id in cache_ids]:
                del self.descriptors[key]
        with self.settled:
            return self.settled.wait_for(
                lambda: not any(self.in_flight.get(c) for c in cache_ids), wait_s)

    @contextlib.contextmanager
    def using(self, cache_id: int):
        """Mark a transfer on the owner's cache `cache_id` as running (see `forget`)."""
        with self.settled:
            self.in_flight[cache_id] = self.in_flight.get(cache_id, 0) + 1
        try:
            yield
        finally:
            with self.settled:
                left = self.in_flight[cache_id] - 1
                if left:
                    self.in_flight[cache_id] = left
                else:
                    del self.in_flight[cache_id]
                self.settled.notify_all()

    def check_alive(self) -> None:
        """A same-host peer that died (or whose pid now names another process) fails the next
        one-sided copy at once, with no round trip."""
        self.ensure_usable()
        if self.peer.same_host and not self.peer.same_process \
                and start_time(self.peer.pid) != self.start_time:
            self.broken = True
            fail(LLMStatusCode.LLM_LINK_FAILED, "cluster %d (pid %d) is gone; link again once it "
                 "is back", self.cluster_id, self.peer.pid)

    def shm_allowed(self, region: Region) -> Region:
        """`region` as the transports may use it: a /dev/shm file only if it is one of the peer's
        own (named for its proven pid in our pid namespace), else without the file."""
        if region.shm_name and not region.shm_name.startswith(self.shm_prefix):
            return msgspec.structs.replace(region, shm_name="", shm_offset=0)
        return region

    @property
    def shm_prefix(self) -> str:
        return f"{SHM_PREFIX}.{self.peer.pid}.{PID_NAMESPACE}." if self.peer.same_host else "\0"

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
        for transport in transports:
            transport.close()
        if self.rpc is not None:
            self.rpc.close()


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
