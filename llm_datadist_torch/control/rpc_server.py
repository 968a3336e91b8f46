"""Request/reply server: one zmq ROUTER socket served by one thread.

Wire format (see rpc_client.py): a request is ``[request_id, frame]`` from a DEALER, so the
ROUTER receives ``[peer_identity, request_id, frame]``; the reply echoes the first two
untouched. The id is opaque here; the client uses it to drop late replies.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import weakref
from typing import Callable, List, Optional, Union

import zmq

from ..status import LLMException, LLMStatusCode
from . import codec
from .host import zmq_context
from .messages import ErrorReply, Message

logger = logging.getLogger(__name__)

# A handler answers at once with a Message, or hands the work to another thread and returns a
# Future of the Message: the serving thread goes on answering others meanwhile.
Handler = Callable[[Message, bytes], Union[Message, "concurrent.futures.Future[Message]"]]

POLL_MS = 50  # upper bound on how long the thread takes to notice `close()` without a wake-up
# Control messages are small metadata; the largest legitimate ones (a Resolve or StageRead with
# lists near their decode-time limit) stay under this. zmq drops bigger frames unread.
MAX_MESSAGE_BYTES = 16 << 20
_COMMAND_TIMEOUT_S = 10.0  # bind/unbind on a running server wait at most for the running handler
_JOIN_TIMEOUT_S = 10.0

_server_ids = iter(range(1, 1 << 62))  # next() on it is atomic under the GIL
_WAKE_ID = b"\x01llmdd-rpc-wake"  # remote peers get ids starting with a zero byte


class RpcServer:
    """Serves ``handler(request, peer_identity) -> reply`` on a ROUTER socket.

    The handler runs on the serving thread, one request at a time; whatever it raises becomes
    an `ErrorReply` and the thread goes on. A handler that returns a Future is answered when
    the Future is done (slow work runs elsewhere; the serving thread only answers). ``peer_identity`` names one client connection (a
    client may use several), so key no long-lived state on it.
    """

    def __init__(self, handler: Handler, name: str = ""):
        self._handler = handler
        self._name = name or f"{next(_server_ids)}"
        ctx = zmq_context()
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # The thread blocks in recv (cheaper than a poller) and looks at its stop flag
        # whenever this timeout or a wake-up ends the wait.
        self._sock.setsockopt(zmq.RCVTIMEO, POLL_MS)
        # Only the serving thread uses the ROUTER once it runs. Other threads queue
        # bind/unbind commands and wake it with a message on a private inproc connection
        # into the same ROUTER; zmq refuses a second peer with the same routing id.
        wake_addr = f"inproc://llmdd-rpc-wake-{id(self):x}-{next(_server_ids)}"
        self._sock.bind(wake_addr)
        self._wake_tx = ctx.socket(zmq.DEALER)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.setsockopt(zmq.ROUTING_ID, _WAKE_ID)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()  # _wake_tx is used by any thread
        self._commands: "queue.SimpleQueue" = queue.SimpleQueue()
        self._late_replies: "queue.SimpleQueue" = queue.SimpleQueue()  # of deferred requests
        self._state_lock = threading.Lock()  # started / closed / direct socket use
        self._endpoints: List[str] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        _live_servers.add(self)

    # ------------------------------------------------------------------ public

    @property
    def name(self) -> str:
        return self._name

    @property
    def endpoints(self) -> List[str]:
        """The endpoints bound now, as zmq reports them (real ports)."""
        return list(self._endpoints)

    def bind(self, endpoint: str) -> str:
        """Listen on `endpoint` and return the bound address ("tcp://127.0.0.1:0" gets a port)."""
        return self._run_socket_op(self._do_bind, endpoint)

    def unbind(self, endpoint: str) -> None:
        """Stop listening on `endpoint` (an address `bind` returned); its connections close."""
        self._run_socket_op(self._do_unbind, endpoint)

    def start(self) -> None:
        with self._state_lock:
            if self._closed:
                raise LLMException(f"rpc server {self._name} is closed",
                                   status_code=LLMStatusCode.LLM_FAILED)
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._serve, daemon=False,
                                            name=f"llmdd-rpc-server-{self._name}")
            self._thread.start()

    def close(self, timeout_s: float = _JOIN_TIMEOUT_S) -> None:
        """Stop and join the serving thread, close the sockets. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        _live_servers.discard(self)
        self._stop.set()
        if thread is not None:
            self._wake()
            if thread is threading.current_thread():
                return  # closed from a handler: the loop exits and closes the sockets itself
            thread.join(timeout_s)
            if thread.is_alive():
                # A handler is stuck; closing the sockets under it would crash. The thread
                # closes them itself when it gets out.
                logger.error("rpc server %s: serving thread did not stop within %.1f s",
                             self._name, timeout_s)
                return
        self._close_sockets()

    def __enter__(self) -> "RpcServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- socket ops

    def _run_socket_op(self, op, endpoint: str):
        with self._state_lock:
            if self._closed:
                raise LLMException(f"rpc server {self._name} is closed",
                                   status_code=LLMStatusCode.LLM_FAILED)
            if self._thread is None or not self._thread.is_alive():
                return op(endpoint)  # nobody serves: the socket is ours to use
            done = threading.Event()
            box: list = []
            self._commands.put((op, endpoint, box, done))
        self._wake()
        if not done.wait(_COMMAND_TIMEOUT_S):
            raise LLMException(f"rpc server {self._name}: no answer from the serving thread "
                               f"for {op.__name__}({endpoint!r})",
                               status_code=LLMStatusCode.LLM_TIMEOUT)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _do_bind(self, endpoint: str) -> str:
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            what = "address already in use" if exc.errno == zmq.EADDRINUSE else str(exc)
            raise LLMException(f"cannot listen on {endpoint}: {what}",
                               status_code=LLMStatusCode.LLM_PARAM_INVALID) from None
        actual = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._endpoints.append(actual)
        logger.debug("rpc server %s listening on %s", self._name, actual)
        return actual

    def _do_unbind(self, endpoint: str) -> None:
        if endpoint not in self._endpoints:
            raise LLMException(f"rpc server {self._name} is not listening on {endpoint} "
                               f"(bound: {self._endpoints})",
                               status_code=LLMStatusCode.LLM_PARAM_INVALID)
        try:
            self._sock.unbind(endpoint)
        except zmq.ZMQError as exc:
            raise LLMException(f"cannot stop listening on {endpoint}: {exc}",
                               status_code=LLMStatusCode.LLM_PARAM_INVALID) from None
        self._endpoints.remove(endpoint)

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_tx.closed:
                return
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # the pipe is full of wake-ups already

    def _close_sockets(self) -> None:
        # Socket.close() is idempotent; the lock keeps _wake() off a closing socket.
        with self._wake_lock:
            for s in (self._sock, self._wake_tx):
                s.close(linger=0)

    # ----------------------------------------------------------- serving loop

    def _serve(self) -> None:
        sock = self._sock
        try:
            while not self._stop.is_set():
                try:
                    frames = sock.recv_multipart()
                except zmq.Again:
                    continue  # POLL_MS passed: look at the stop flag
                if frames[0] == _WAKE_ID:
                    self._run_commands()
                    self._send_late_replies()
                    continue
                reply = self._reply_frames(frames)
                if reply is None:
                    continue
                try:
                    # ROUTER never blocks: it drops replies to peers that are gone or full.
                    sock.send_multipart(reply, zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    logger.warning("rpc server %s: reply dropped: %s", self._name, exc)
        except Exception:  # a bug in this loop, not in a handler
            logger.exception("rpc server %s: serving thread failed", self._name)
        finally:
            self._fail_pending_commands()
            if self._closed:
                self._close_sockets()  # idempotent; close() may also do it after the join

    def _run_commands(self) -> None:
        while True:
            try:
                op, endpoint, box, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                box.append((True, op(endpoint)))
            except Exception as exc:  # handed to the caller, never kills the loop
                box.append((False, exc))
            done.set()

    def _send_late_replies(self) -> None:
        while True:
            try:
                reply = self._late_replies.get_nowait()
            except queue.Empty:
                return
            try:
                self._sock.send_multipart(reply, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                logger.warning("rpc server %s: reply dropped: %s", self._name, exc)

    def _answer_later(self, peer: bytes, request_id: bytes,
                      future: "concurrent.futures.Future[Message]") -> None:
        """(Any thread.) Queue the reply of a deferred request for the serving thread."""
        try:
            reply = future.result()
            if not isinstance(reply, Message):
                raise TypeError(f"handler returned {type(reply).__name__}, not a Message")
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an ErrorReply
            reply = _error_reply(self._name, exc)
        self._late_replies.put([peer, request_id, self._encode(reply)])
        self._wake()

    def _fail_pending_commands(self) -> None:
        while True:
            try:
                _, _, box, done = self._commands.get_nowait()
            except queue.Empty:
                return
            box.append((False, LLMException(f"rpc server {self._name} is closed",
                                            status_code=LLMStatusCode.LLM_FAILED)))
            done.set()

    def _reply_frames(self, frames: List[bytes]) -> Optional[List[bytes]]:
        if len(frames) < 2:
            return None  # no request id (not our client): nobody would match a reply
        peer, request_id = frames[0], frames[1]
        if len(frames) != 3:
            reply: Message = ErrorReply(
                status_code=int(LLMStatusCode.LLM_PARAM_INVALID),
                message=f"malformed control request: {len(frames) - 1} parts, expected 2")
        else:
            reply = self._handle(frames[2], peer)
            if isinstance(reply, concurrent.futures.Future):
                reply.add_done_callback(
                    lambda done: self._answer_later(peer, request_id, done))
                return None
        return [peer, request_id, self._encode(reply)]

    def _encode(self, reply: Message) -> bytes:
        try:
            return codec.encode(reply)
        except Exception as exc:
            logger.exception("rpc server %s: cannot encode reply %r", self._name, reply)
            return codec.encode(ErrorReply(status_code=int(LLMStatusCode.LLM_FAILED),
                                           message=f"cannot encode reply: {exc!r}"))

    def _handle(self, payload: bytes, peer: bytes):
        try:
            request = codec.decode(payload)
            reply = self._handler(request, peer)
            if not isinstance(reply, (Message, concurrent.futures.Future)):
                raise TypeError(f"handler returned {type(reply).__name__}, not a Message")
            return reply
        except Exception as exc:
            return _error_reply(self._name, exc)


def _error_reply(name: str, exc: BaseException) -> ErrorReply:
    if isinstance(exc, LLMException):
        code = exc.status_code
        if code == LLMStatusCode.LLM_SUCCESS:  # a bare LLMException("...") still failed
            code = LLMStatusCode.LLM_FAILED
        logger.debug("rpc server %s: request failed: %s (%s)", name, exc, code)
        return ErrorReply(status_code=int(code), message=str(exc))
    logger.error("rpc server %s: handler failed: %r", name, exc, exc_info=exc)
    return ErrorReply(status_code=int(LLMStatusCode.LLM_FAILED), message=repr(exc))


# --------------------------------------------------------------- interpreter exit

_live_servers: "weakref.WeakSet[RpcServer]" = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for server in list(_live_servers):
        try:
            server.close()
        except Exception:
            logger.exception("rpc server %s: close at exit failed", server.name)


# Python joins non-daemon threads *before* running atexit handlers, so a server left open
# would hang interpreter exit. threading's own exit hooks run before that join (this is
# what concurrent.futures uses); plain atexit is the fallback for interpreters without it.
try:
    threading._register_atexit(_close_all_at_exit)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):
    import atexit

    atexit.register(_close_all_at_exit)
