"""Request/reply client for one `RpcServer` endpoint.

A request goes out as ``[request_id, frame]`` on a DEALER socket and the server echoes the id.
Ids are unique per client, so a reply that arrives after its call timed out is recognised
and dropped by whichever later call reads it.

Concurrency: zmq sockets are not thread-safe, so a call checks a socket out of a small pool
for its send and receive. Concurrent callers get their own connections instead of queueing
behind one lock; a single caller reuses the one warm connection.
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import struct
import threading
import time
from typing import Callable, Deque, List, Optional

import zmq

from .. import faults
from ..status import LLMException, LLMStatusCode, code_2_status
from . import codec
from .host import zmq_context
from .messages import ErrorReply, Message
from .rpc_server import MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)

_ID = struct.Struct("<Q")
_MAX_WAIT_MS = 2**31 - 1  # zmq timeouts are int32 milliseconds
_RECONNECT_IVL_MS = 20  # a server that starts late is found within ~20 ms ...
_RECONNECT_IVL_MAX_MS = 200  # ... backing off to 5 attempts/s while it stays away
ALIVE_POLL_MS = 100  # how often a call with a liveness check looks at its peer while waiting
_NEW = object()  # handed to a waiter instead of a socket: "open a new connection"


class _Slot:
    """A waiting caller; `_checkin` puts the socket it hands over in ``sock``."""

    __slots__ = ("sock",)

    def __init__(self):
        self.sock = None


class RpcClient:
    """Calls on the server at `endpoint`; `call` is thread-safe, `close` idempotent."""

    def __init__(self, endpoint: str, *, max_connections: int = 16):
        self._endpoint = endpoint
        self._ids = itertools.count(1)  # next() is atomic under the GIL
        self._cond = threading.Condition()
        self._idle: List[zmq.Socket] = []
        self._waiters: Deque[_Slot] = collections.deque()  # oldest first
        self._max = max(1, max_connections)
        self._open = 0  # sockets created and not closed: idle + checked out
        self._closed = False
        # Connect now (also validates the endpoint), so the first call finds the TCP
        # connection made or under way.
        self._idle.append(self._new_socket())
        self._open = 1

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def call(self, request: Message, timeout_s: float,
             alive: Optional[Callable[[], None]] = None) -> Message:
        """Send `request`, return its reply; every wait ends by ``now + timeout_s``.

        `alive`, if given, is asked every `ALIVE_POLL_MS` while the reply is awaited and raises
        when the peer is known to be gone (the call then fails at once, not at the deadline).

        Raises LLMException: the server's code for an `ErrorReply`; LLM_TIMEOUT when the
        server cannot be reached or does not answer in time; LLM_LINK_FAILED /
        LLM_PARAM_INVALID when the reply is another protocol version / undecodable.
        """
        payload = codec.encode(request)
        if not timeout_s > 0:  # a deadline already spent: send nothing the caller won't wait for
            raise self._timeout(timeout_s, "no time left to send", sent=False)
        if not faults.before_request(type(request).__name__):
            time.sleep(timeout_s)  # a lost message: nobody answers until the deadline
            raise self._timeout(timeout_s, "no reply (message dropped: fault injected)")
        deadline = time.monotonic() + timeout_s
        request_id = _ID.pack(next(self._ids))
        sock = self._checkout(deadline, timeout_s)
        reusable = True
        try:
            self._send(sock, request_id, payload, deadline, timeout_s)
            data = self._receive(sock, request_id, deadline, timeout_s, alive)
            try:
                reply = codec.decode(data)
            except LLMException as exc:
                reusable = False  # a peer that speaks garbage: drop this connection
                raise LLMException(f"{self._endpoint}: {exc}",
                                   status_code=exc.status_code) from None
        finally:
            self._checkin(sock, reusable)
        if isinstance(reply, ErrorReply):
            raise LLMException(f"{self._endpoint}: {reply.message}",
                               status_code=code_2_status(reply.status_code))
        return reply

    def close(self) -> None:
        """Close idle connections now, busy ones when their call returns. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for sock in idle:
            sock.close(linger=0)

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ sockets

    def _new_socket(self) -> zmq.Socket:
        sock = zmq_context().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # IMMEDIATE: queue nothing for a peer that is not connected. A send to a dead
        # endpoint then waits (bounded by the deadline) instead of sitting in a buffer and
        # reaching a server that comes up after the caller gave up.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
        try:
            sock.connect(self._endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise LLMException(f"cannot connect to {self._endpoint}: {exc}",
                               status_code=LLMStatusCode.LLM_PARAM_INVALID) from None
        return sock

    def _checkout(self, deadline: float, timeout_s: float) -> zmq.Socket:
        with self._cond:
            if self._closed:
                raise self._closed_error()
            if self._idle:
                return self._idle.pop()  # LIFO: the most recently used, warm one
            if self._open < self._max:
                self._open += 1
                sock = None
            else:
                sock = self._wait_for_socket(deadline, timeout_s)
        if sock is not None and sock is not _NEW:
            return sock
        try:
            return self._new_socket()
        except BaseException:
            with self._cond:
                self._open -= 1
            raise

    def _wait_for_socket(self, deadline: float, timeout_s: float):
        # First come, first served: `_checkin` hands the socket to the oldest waiter, so a
        # thread that just returned one cannot take it back ahead of threads already waiting.
        slot = _Slot()
        self._waiters.append(slot)
        try:
            while slot.sock is None:
                if self._closed:
                    raise self._closed_error()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout(timeout_s, "all connections busy", sent=False)
                self._cond.wait(remaining)
        except BaseException:
            if slot.sock is not None:  # handed over just as we gave up: pass it on
                self._release_locked(slot.sock, reusable=True)
            else:
                self._waiters.remove(slot)
            raise
        return slot.sock

    def _checkin(self, sock: zmq.Socket, reusable: bool) -> None:
        with self._cond:
            self._release_locked(sock, reusable)

    def _release_locked(self, sock, reusable: bool) -> None:
        """Give back `sock` (or `_NEW`): to the oldest waiter, else to the idle list."""
        if sock is not _NEW and (self._closed or not reusable):
            sock.close(linger=0)
            sock = _NEW  # a waiter may open a replacement
        if sock is _NEW:
            self._open -= 1
            if self._closed or not self._waiters:
                return
            self._open += 1
        if self._waiters:
            self._waiters.popleft().sock = sock
            self._cond.notify_all()
        else:
            self._idle.append(sock)

    def _closed_error(self) -> LLMException:
        return LLMException(f"{self._endpoint}: rpc client is closed",
                            status_code=LLMStatusCode.LLM_FAILED)

    # ----------------------------------------------------------------- exchange

    def _send(self, sock, request_id: bytes, payload: bytes, deadline: float,
              timeout_s: float) -> None:
        try:
            sock.send_multipart((request_id, payload), zmq.NOBLOCK)  # connected: never waits
            return
        except zmq.Again:
            pass
        # Not connected (yet): with IMMEDIATE the send waits for the connection.
        sock.setsockopt(zmq.SNDTIMEO, _wait_ms(deadline))
        try:
            sock.send_multipart((request_id, payload))
        except zmq.Again:
            raise self._timeout(timeout_s, "could not connect") from None

    def _receive(self, sock, request_id: bytes, deadline: float, timeout_s: float,
                 alive: Optional[Callable[[], None]]) -> bytes:
        while True:
            wait_ms = _wait_ms(deadline)
            if alive is not None:
                wait_ms = min(wait_ms, ALIVE_POLL_MS)
            sock.setsockopt(zmq.RCVTIMEO, wait_ms)
            try:
                frames = sock.recv_multipart()
            except zmq.Again:
                if alive is not None and time.monotonic() < deadline:
                    alive()
                    continue
                raise self._timeout(timeout_s, "no reply") from None
            if len(frames) == 2 and frames[0] == request_id:
                return frames[1]
            # The reply to an earlier call on this socket that timed out.
            logger.debug("%s: dropping a late reply", self._endpoint)
            if time.monotonic() >= deadline:
                raise self._timeout(timeout_s, "no reply")

    def _timeout(self, timeout_s: float, what: str, sent: bool = True) -> LLMException:
        """LLM_TIMEOUT; `sent` tells the caller whether the request went out (a request that
        waited for a free connection until its deadline says nothing about the peer)."""
        exc = LLMException(f"{self._endpoint}: {what} within {timeout_s:.3f} s",
                           status_code=LLMStatusCode.LLM_TIMEOUT)
        exc.sent = sent
        return exc


def _wait_ms(deadline: float) -> int:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return 0
    return min(_MAX_WAIT_MS, max(1, math.ceil(remaining * 1000)))
