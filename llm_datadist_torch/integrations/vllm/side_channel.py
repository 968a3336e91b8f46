"""The side channel between engines: a small zmq request/reply protocol of typed messages.

The prefill engine's scheduler serves it (`SideChannelServer`, one thread); decoders ask
(`SideChannelClient`). Its address is the `remote_host`/`remote_port` of the kv_transfer_params.

* `Hello(rank)` -> `HelloReply`: the engine id, its tensor-parallel size, its lease length, and
  for worker `rank` the `LLMDataDist` cluster id, data-plane address and KV `Geometry`.
* `Renew({request id: lease token})` -> `RenewReply`: extends those leases; names the unknown.
* `Release(request id, lease token, rank)` -> `ReleaseReply(intact)`: decoder rank `rank`
  (-1: all ranks) is done with the request's blocks. `intact` says whether the lease held until
  now, i.e. whether the blocks were still the request's while the decoder read them.
* `Status()` -> `StatusReply`: lease counters, for operators and tests.

Messages are msgpack (msgspec, never pickle); a malformed request gets an `ErrorReply`. Every
client call has a deadline; a late reply to an abandoned call is dropped by its call id.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Union

import msgspec
import zmq

from .config import LOGGER_PREFIX
from .geometry import Geometry

logger = logging.getLogger(LOGGER_PREFIX + __name__)

MAX_MESSAGE_BYTES = 1 << 20


class WorkerInfo(msgspec.Struct, frozen=True):
    cluster_id: int
    host: str
    port: int
    geometry: Geometry


class Hello(msgspec.Struct, tag="hello"):
    rank: int


class Renew(msgspec.Struct, tag="renew"):
    leases: Dict[str, str]


class Release(msgspec.Struct, tag="release"):
    request_id: str
    token: str
    rank: int


class Status(msgspec.Struct, tag="status"):
    pass


class HelloReply(msgspec.Struct, tag="hello_reply"):
    engine_id: str
    tp_size: int
    lease_s: float
    worker: WorkerInfo


class RenewReply(msgspec.Struct, tag="renew_reply"):
    unknown: List[str]


class ReleaseReply(msgspec.Struct, tag="release_reply"):
    intact: bool


class StatusReply(msgspec.Struct, tag="status_reply"):
    open: int          # leases held now
    opened: int        # leases ever opened
    released: int      # freed because every decoder rank was done
    expired: int       # freed because nobody renewed them in time
    late: int          # releases that came after the lease was gone


class ErrorReply(msgspec.Struct, tag="error"):
    message: str


Request = Union[Hello, Renew, Release, Status]
Reply = Union[HelloReply, RenewReply, ReleaseReply, StatusReply, ErrorReply]

_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


class SideChannelError(RuntimeError):
    """The peer's side channel did not answer in time, or answered with an error."""


class SideChannelServer:
    """Serves `handler(request) -> reply` on a ROUTER socket from one daemon thread."""

    def __init__(self, host: str, port: int, handler: Callable[[Request], Reply]):
        self._handler = handler
        self._stop = threading.Event()
        self._socket = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        try:
            self._socket.bind(f"tcp://{host or '*'}:{port or '*'}")
        except zmq.ZMQError:
            self._socket.close()
            raise
        endpoint = self._socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.port = int(endpoint.rsplit(":", 1)[1])
        self._thread = threading.Thread(target=self._serve, name="llmdd-vllm-side-channel",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            if len(frames) != 3:
                continue  # not a SideChannelClient: [identity, call id, body]
            identity, call_id, body = frames
            try:
                reply = self._handler(_request_decoder.decode(body))
            except msgspec.DecodeError as exc:
                reply = ErrorReply(f"malformed request: {exc}")
            except Exception as exc:  # a bug must not kill the channel
                logger.exception("side-channel handler failed")
                reply = ErrorReply(f"{type(exc).__name__}: {exc}")
            try:
                self._socket.send_multipart([identity, call_id, _encoder.encode(reply)])
            except zmq.ZMQError as exc:
                logger.debug("side-channel reply dropped: %s", exc)
        self._socket.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class SideChannelClient:
    """Calls one peer's side channel; thread-safe (one call at a time)."""

    def __init__(self, host: str, port: int, timeout_s: float):
        self.address = f"{host}:{port}"
        self._timeout_ms = int(timeout_s * 1000)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._socket = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._socket.connect(f"tcp://{host}:{port}")

    def call(self, request: Request, timeout_s: Optional[float] = None) -> Reply:
        timeout_ms = self._timeout_ms if timeout_s is None else int(timeout_s * 1000)
        with self._lock:
            call_id = str(next(self._ids)).encode()
            self._socket.send_multipart([call_id, _encoder.encode(request)])
            poller = zmq.Poller()
            poller.register(self._socket, zmq.POLLIN)
            deadline = time.monotonic() + timeout_ms / 1000
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not poller.poll(remaining_ms):
                    break
                frames = self._socket.recv_multipart()
                if len(frames) == 2 and frames[0] == call_id:  # else: a late reply, dropped
                    reply = _reply_decoder.decode(frames[1])
                    if isinstance(reply, ErrorReply):
                        raise SideChannelError(f"{self.address}: {reply.message}")
                    return reply
        raise SideChannelError(f"{self.address} did not answer {type(request).__name__} within "
                               f"{timeout_ms} ms")

    def close(self) -> None:
        with self._lock:
            self._socket.close()
