"""Control-plane messaging: codec, RpcServer, RpcClient over real sockets on 127.0.0.1."""
import contextlib
import logging
import multiprocessing
import os
import socket
import threading
import time

import pytest
import zmq

from llm_datadist_torch.control import codec
from llm_datadist_torch.control.host import free_port, local_host_id, zmq_context
from llm_datadist_torch.control.messages import (
    PROTOCOL_VERSION, ErrorReply, Hello, HelloReply, Ping, Pong)
from llm_datadist_torch.control.rpc_client import RpcClient
from llm_datadist_torch.control.rpc_server import RpcServer
from llm_datadist_torch.status import LLMException, LLMStatusCode
from helpers import raises_llm

pytestmark = pytest.mark.timeout(60)

ANY_PORT = "tcp://127.0.0.1:0"
SERVER_THREAD_PREFIX = "llmdd-rpc-server"


def server_threads():
    return [t for t in threading.enumerate() if t.name.startswith(SERVER_THREAD_PREFIX)]


@pytest.fixture(autouse=True)
def no_server_thread_survives():
    yield
    assert server_threads() == []


def make_hello(pid=1, cluster_id=7, reply_endpoint=""):
    return Hello(cluster_id=cluster_id, host_id=local_host_id(), pid=pid,
                 reply_endpoint=reply_endpoint)


def echo_handler(request, peer):
    """Hello -> HelloReply carrying the request's pid; Ping -> Pong."""
    if isinstance(request, Ping):
        return Pong()
    assert isinstance(request, Hello) and isinstance(peer, bytes) and peer
    return HelloReply(cluster_id=99, host_id=local_host_id(), pid=request.pid, accepted=True,
                      status_code=int(LLMStatusCode.LLM_SUCCESS), message="")


@pytest.fixture
def serve():
    """serve(handler) -> (server, endpoint); servers and clients are closed at the end."""
    closers = []

    def _serve(handler=echo_handler, name="t"):
        server = RpcServer(handler, name=name)
        closers.append(server.close)
        endpoint = server.bind(ANY_PORT)
        server.start()
        return server, endpoint

    _serve.closers = closers
    yield _serve
    for close in reversed(closers):
        close()


@pytest.fixture
def client(serve):
    def _client(endpoint, **kwargs):
        c = RpcClient(endpoint, **kwargs)
        serve.closers.append(c.close)
        return c
    return _client


@contextlib.contextmanager
def raw_dealer(endpoint):
    sock = zmq_context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close()


def free_tcp_endpoint():
    """An endpoint on which nothing listens (the port was just free)."""
    return f"tcp://127.0.0.1:{free_port()}"


# -- codec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("msg", [
    make_hello(reply_endpoint="tcp://10.0.0.1:5000"),
    HelloReply(cluster_id=2**64 - 1, host_id="b:h", pid=3, accepted=False, status_code=int(LLMStatusCode.LLM_LINK_FAILED),
               message="no"),
    Ping(), Pong(), ErrorReply(status_code=int(LLMStatusCode.LLM_FAILED), message="x"),
])
def test_codec_round_trip(msg):
    assert codec.decode(codec.encode(msg)) == msg


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x01", bytes([0x92, PROTOCOL_VERSION]) + b"\x81\xa4type\xa3zzz",
                                  codec.encode(Ping())[:-1], b"\x92\xa1x\x80"])
def test_codec_garbage_is_param_invalid(data):
    with raises_llm(LLMStatusCode.LLM_PARAM_INVALID, "undecodable"):
        codec.decode(data)


def test_codec_other_version_is_link_failed():
    other = PROTOCOL_VERSION + 1
    with raises_llm(LLMStatusCode.LLM_LINK_FAILED) as info:
        codec.decode(codec.encode(Ping(), protocol_version=other))
    assert str(other) in str(info.value) and str(PROTOCOL_VERSION) in str(info.value)
    # A later version may carry message types this side does not know: still a version error.
    with raises_llm(LLMStatusCode.LLM_LINK_FAILED):
        codec.decode(b"\x92" + bytes([other]) + b"\x81\xa4type\xa9brand_new")


def test_codec_rejects_non_messages():
    with pytest.raises(TypeError):
        codec.encode({"type": "ping"})


def test_local_host_id():
    host_id = local_host_id()
    assert host_id.endswith(socket.gethostname())
    if os.path.exists("/proc/sys/kernel/random/boot_id"):
        with open("/proc/sys/kernel/random/boot_id") as f:
            assert host_id == f"{f.read().strip()}:{socket.gethostname()}"


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# -- request / reply --------------------------------------------------------------------------

def test_hello_round_trip(serve, client):
    _, endpoint = serve()
    assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
    reply = client(endpoint).call(make_hello(pid=1234), timeout_s=5)
    assert isinstance(reply, HelloReply)
    assert reply.pid == 1234 and reply.accepted and reply.cluster_id == 99


def test_error_reply_keeps_status_code(serve, client):
    def handler(request, peer):
        raise LLMException("no such key", status_code=LLMStatusCode.LLM_KV_CACHE_NOT_EXIST)
    _, endpoint = serve(handler)
    with raises_llm(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, "no such key") as info:
        client(endpoint).call(Ping(), timeout_s=5)
    assert endpoint in str(info.value)


def test_handler_value_error_is_llm_failed(serve, client):
    def handler(request, peer):
        raise ValueError("boom")
    _, endpoint = serve(handler)
    c = client(endpoint)
    with raises_llm(LLMStatusCode.LLM_FAILED, "boom"):
        c.call(Ping(), timeout_s=5)
    with raises_llm(LLMStatusCode.LLM_FAILED, "boom"):  # the serving thread survived
        c.call(Ping(), timeout_s=5)


def test_handler_returning_a_non_message_is_llm_failed(serve, client):
    _, endpoint = serve(lambda request, peer: None)
    with raises_llm(LLMStatusCode.LLM_FAILED, "handler returned"):
        client(endpoint).call(Ping(), timeout_s=5)


def test_bare_llm_exception_in_handler_is_not_success(serve, client):
    def handler(request, peer):
        raise LLMException("bare")  # reports LLM_SUCCESS upstream-style
    _, endpoint = serve(handler)
    with raises_llm(LLMStatusCode.LLM_FAILED, "bare"):
        client(endpoint).call(Ping(), timeout_s=5)


def test_garbage_frames_get_param_invalid_and_server_survives(serve, client):
    _, endpoint = serve()
    with raw_dealer(endpoint) as raw:
        raw.send_multipart([b"id-1", b"\xc1 not msgpack"])
        rid, payload = raw.recv_multipart()
        reply = codec.decode(payload)
        assert rid == b"id-1" and isinstance(reply, ErrorReply)
        assert reply.status_code == LLMStatusCode.LLM_PARAM_INVALID
        raw.send_multipart([b"id-2", b"x", b"y"])  # wrong number of parts
        rid, payload = raw.recv_multipart()
        assert rid == b"id-2"
        assert codec.decode(payload).status_code == LLMStatusCode.LLM_PARAM_INVALID
        raw.send(b"no request id")  # unanswerable; must not hurt
    assert isinstance(client(endpoint).call(Ping(), timeout_s=5), Pong)


def test_request_of_other_version_is_link_failed(serve):
    _, endpoint = serve()
    with raw_dealer(endpoint) as raw:
        raw.send_multipart([b"id", codec.encode(Ping(), protocol_version=PROTOCOL_VERSION + 1)])
        rid, payload = raw.recv_multipart()
    reply = codec.decode(payload)
    assert isinstance(reply, ErrorReply)
    assert reply.status_code == LLMStatusCode.LLM_LINK_FAILED
    assert str(PROTOCOL_VERSION + 1) in reply.message


def test_reply_of_other_version_is_link_failed(client):
    """A fake server that speaks another version: the client fails the call, no hang."""
    router = zmq_context().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(ANY_PORT)
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    stop = threading.Event()

    def fake_server():
        while not stop.is_set():
            if router.poll(20):
                peer, rid, _ = router.recv_multipart()
                router.send_multipart(
                    [peer, rid, codec.encode(Pong(), protocol_version=PROTOCOL_VERSION + 5)])

    thread = threading.Thread(target=fake_server)
    thread.start()
    try:
        with raises_llm(LLMStatusCode.LLM_LINK_FAILED, "version") as info:
            client(endpoint).call(Ping(), timeout_s=5)
        assert endpoint in str(info.value)
    finally:
        stop.set()
        thread.join(5)
        router.close()


def test_dead_endpoint_times_out(client):
    endpoint = free_tcp_endpoint()
    c = client(endpoint)
    start = time.monotonic()
    with raises_llm(LLMStatusCode.LLM_TIMEOUT) as info:
        c.call(Ping(), timeout_s=0.3)
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 0.3 + 0.2
    assert endpoint in str(info.value) and "0.300" in str(info.value)


def test_request_to_dead_endpoint_is_not_delivered_later(serve, client):
    """IMMEDIATE: a request that timed out unsent never reaches a server started later."""
    endpoint = free_tcp_endpoint()
    c = client(endpoint)
    with raises_llm(LLMStatusCode.LLM_TIMEOUT):
        c.call(make_hello(pid=1), timeout_s=0.2)
    seen = []

    def handler(request, peer):
        seen.append(request.pid)
        return echo_handler(request, peer)

    server = RpcServer(handler, name="late")
    serve.closers.append(server.close)
    assert server.bind(endpoint) == endpoint
    server.start()
    assert c.call(make_hello(pid=2), timeout_s=5).pid == 2
    assert seen == [2]


def test_spent_deadline_sends_nothing(serve, client):
    seen = []
    _, endpoint = serve(lambda request, peer: seen.append(request) or Pong())
    c = client(endpoint)
    for timeout_s in (0, -1.0):
        with raises_llm(LLMStatusCode.LLM_TIMEOUT):
            c.call(Ping(), timeout_s=timeout_s)
    assert isinstance(c.call(Ping(), timeout_s=5), Pong)
    assert seen == [Ping()]


def test_late_reply_is_discarded(serve, client, caplog):
    caplog.set_level(logging.DEBUG, logger="llm_datadist_torch.control.rpc_client")

    def handler(request, peer):
        if request.pid == 1:
            time.sleep(0.4)
        return echo_handler(request, peer)
    _, endpoint = serve(handler)
    c = client(endpoint, max_connections=1)  # one socket: the late reply lands where call 2 reads
    assert c.call(make_hello(pid=0), timeout_s=5).pid == 0  # connected
    with raises_llm(LLMStatusCode.LLM_TIMEOUT, "no reply"):
        c.call(make_hello(pid=1), timeout_s=0.1)
    assert c.call(make_hello(pid=2), timeout_s=5).pid == 2
    assert "dropping a late reply" in caplog.text  # pid 1's reply came first and was dropped
    assert c.call(make_hello(pid=3), timeout_s=5).pid == 3


def test_eight_threads_get_their_own_replies(serve, client):
    _, endpoint = serve()
    c = client(endpoint)
    errors = []

    def worker(t):
        try:
            for i in range(200):
                pid = t * 1000 + i
                assert c.call(make_hello(pid=pid), timeout_s=10).pid == pid
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


@pytest.mark.parametrize("max_connections", [1, 3])
def test_more_threads_than_connections(serve, client, max_connections):
    _, endpoint = serve()
    c = client(endpoint, max_connections=max_connections)
    results = []

    def worker(t):
        results.extend(c.call(make_hello(pid=t * 100 + i), timeout_s=10).pid == t * 100 + i
                       for i in range(50))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 400 and all(results)


# -- lifecycle --------------------------------------------------------------------------------

def test_close_joins_and_is_idempotent(client):
    server = RpcServer(echo_handler, name="lifecycle")
    endpoint = server.bind(ANY_PORT)
    server.start()
    server.start()  # no second thread
    assert [t.name for t in server_threads()] == [f"{SERVER_THREAD_PREFIX}-lifecycle"]
    c = client(endpoint)
    assert isinstance(c.call(Ping(), timeout_s=5), Pong)
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start < 1.0  # woken, not waiting out a poll
    assert server_threads() == []
    server.close()
    with raises_llm(LLMStatusCode.LLM_FAILED):
        server.bind(ANY_PORT)
    with raises_llm(LLMStatusCode.LLM_FAILED):
        server.start()
    c.close()
    c.close()
    with raises_llm(LLMStatusCode.LLM_FAILED, "closed"):
        c.call(Ping(), timeout_s=1)


def test_busy_client_times_out_waiting_for_a_connection(serve, client):
    release = threading.Event()

    def handler(request, peer):
        release.wait(5)
        return Pong()

    _, endpoint = serve(handler)
    c = client(endpoint, max_connections=1)
    holder = threading.Thread(target=c.call, args=(Ping(), 5))
    holder.start()
    try:
        time.sleep(0.05)
        with raises_llm(LLMStatusCode.LLM_TIMEOUT, "busy"):
            c.call(Ping(), timeout_s=0.1)
    finally:
        release.set()
        holder.join(5)
    assert isinstance(c.call(Ping(), timeout_s=5), Pong)


def test_close_never_started_server():
    server = RpcServer(echo_handler)
    server.bind(ANY_PORT)
    server.close()
    server.close()


def test_close_from_inside_a_handler(client):
    holder = []

    def handler(request, peer):
        holder[0].close()
        return Pong()

    server = RpcServer(handler, name="selfclose")
    holder.append(server)
    endpoint = server.bind(ANY_PORT)
    server.start()
    try:  # LINGER 0: the reply may be dropped when the sockets close right after it
        client(endpoint).call(Ping(), timeout_s=0.5)
    except LLMException as exc:
        assert exc.status_code == LLMStatusCode.LLM_TIMEOUT
    deadline = time.monotonic() + 5
    while server_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    server.close()  # a no-op now


def test_bind_to_used_port_is_param_invalid(serve):
    _, endpoint = serve()
    other = RpcServer(echo_handler, name="other")
    try:
        with raises_llm(LLMStatusCode.LLM_PARAM_INVALID, "already in use") as info:
            other.bind(endpoint)
        assert endpoint in str(info.value)
        with raises_llm(LLMStatusCode.LLM_PARAM_INVALID):
            other.bind("tcp://not an endpoint")
        other.start()
        with raises_llm(LLMStatusCode.LLM_PARAM_INVALID, "already in use"):
            other.bind(endpoint)  # through the serving thread
    finally:
        other.close()


def test_unbind_and_rebind_moves_the_listener(serve, client):
    server, old = serve()
    old_client = client(old)
    assert isinstance(old_client.call(Ping(), timeout_s=5), Pong)
    new = server.bind(ANY_PORT)  # while serving
    assert server.endpoints == [old, new]
    server.unbind(old)
    assert server.endpoints == [new]
    assert isinstance(client(new).call(Ping(), timeout_s=5), Pong)
    with raises_llm(LLMStatusCode.LLM_TIMEOUT):
        old_client.call(Ping(), timeout_s=0.3)
    with raises_llm(LLMStatusCode.LLM_PARAM_INVALID, "not listening"):
        server.unbind(old)
    assert server.bind(old) == old  # the old port is free again
    assert isinstance(old_client.call(Ping(), timeout_s=5), Pong)


def test_invalid_client_endpoint_is_param_invalid():
    with raises_llm(LLMStatusCode.LLM_PARAM_INVALID, "cannot connect"):
        RpcClient("nonsense://x")


# -- server in another process ----------------------------------------------------------------

def _child_server(endpoints, stop, result):
    server = RpcServer(echo_handler, name="child")
    endpoints.put(server.bind(ANY_PORT))
    server.start()
    stop.wait(30)
    server.close()
    result.put([t.name for t in threading.enumerate() if t.name.startswith(SERVER_THREAD_PREFIX)])


@pytest.mark.multiprocess
def test_server_in_spawned_process(client):
    ctx = multiprocessing.get_context("spawn")
    endpoints, result, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_child_server, args=(endpoints, stop, result), daemon=True)
    child.start()
    try:
        endpoint = endpoints.get(timeout=30)
        c = client(endpoint)
        assert c.call(make_hello(pid=os.getpid()), timeout_s=5).pid == os.getpid()
        assert isinstance(c.call(Ping(), timeout_s=5), Pong)
        stop.set()
        assert result.get(timeout=10) == []
        child.join(10)
        assert child.exitcode == 0
        with raises_llm(LLMStatusCode.LLM_TIMEOUT):
            c.call(Ping(), timeout_s=0.2)
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
