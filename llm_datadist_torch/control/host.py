"""Process- and host-level singletons for the control plane: host identity, zmq context."""
from __future__ import annotations

import os
import socket
import threading
from typing import Optional

import zmq

_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def local_host_id() -> str:
    """``<boot id>:<hostname>``, or just the hostname where there is no boot id.

    The boot id tells two hosts with the same name apart (containers, clones) and changes on
    reboot, so a peer that reports our id really shares our kernel (shm, process_vm_readv).
    """
    hostname = socket.gethostname()
    try:
        with open(_BOOT_ID_PATH, "r", encoding="ascii") as f:
            boot_id = f.read().strip()
    except OSError:
        return hostname
    return f"{boot_id}:{hostname}" if boot_id else hostname


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago.

    Only for where a port must be known before anything listens on it (a ``listen_ip_info``, a
    rank table): another process may take it in between. A server that can bind port 0 itself
    should do that instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


_ctx_lock = threading.Lock()
_ctx: Optional[zmq.Context] = None
_ctx_pid = -1


def zmq_context() -> zmq.Context:
    """The library's own zmq context, shared by every client and server in this process.

    Private rather than ``zmq.Context.instance()`` so that another library terminating the
    global instance cannot break us, and we never terminate one that others use. Sockets
    close themselves (LINGER 0); the context is never terminated. A forked child gets a
    fresh one: a context does not survive fork.
    """
    global _ctx, _ctx_pid
    pid = os.getpid()
    ctx = _ctx
    if ctx is not None and _ctx_pid == pid:
        return ctx
    with _ctx_lock:
        if _ctx is None or _ctx_pid != pid:
            _ctx = zmq.Context()
            _ctx_pid = pid
        return _ctx
