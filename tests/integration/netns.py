"""Two "hosts" on one machine: two Linux network namespaces joined by a veth pair.

    with VethPair() as net:              # skips the test (pytest.skip) where it cannot be built
        child = h.spawn(netns_agent, net.ns[0], net.ip[0])
        net.set_link(False)               # cable pulled; set_link(True) plugs it back

Only the addresses this module assigns (10.231.N.1/24 and .2/24), inside namespaces it creates,
are used; `close()` deletes both namespaces (and with them the veth pair), also after a failure,
and a namespace left by an earlier run that crashed is removed before the pair is built.
Children enter their namespace with setns(2) before the library opens any socket; they share
the kernel (same boot id), so the library sees one host: tests force `transfer_backend`.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess
from typing import Optional, Tuple

import pytest

import agents
from harness import serve
from helpers import cluster_info

PREFIX = "lldt"                 # namespace / device names start with this
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
_serial = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def unavailable_reason() -> Optional[str]:
    """Why namespaces cannot be used here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


class VethPair:
    """Namespaces `ns[0]`, `ns[1]` with addresses `ip[0]`, `ip[1]` on a veth pair."""

    def __init__(self, index: Optional[int] = None):
        self.index = (os.getpid() % 200) + 20 if index is None else index
        tag = f"{PREFIX}{os.getpid()}-{next(_serial)}"  # several pairs may coexist
        self.ns: Tuple[str, str] = (f"{tag}a", f"{tag}b")
        self.dev: Tuple[str, str] = (f"{PREFIX}{self.index}a", f"{PREFIX}{self.index}b")
        self.ip: Tuple[str, str] = (f"10.231.{self.index}.1", f"10.231.{self.index}.2")

    def open(self) -> "VethPair":
        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
        _remove_stale()
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
            _ip("link", "add", self.dev[0], "netns", self.ns[0], "type", "veth",
                "peer", "name", self.dev[1], "netns", self.ns[1])
            for ns, dev, ip in zip(self.ns, self.dev, self.ip):
                _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", dev, "up")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            self.close()
            detail = getattr(exc, "stderr", "") or exc
            pytest.skip(f"cannot build network namespaces here: {str(detail).strip()}")
        return self

    def set_link(self, up: bool) -> None:
        """Bring the veth link down (as if the cable were pulled) or up again."""
        _ip("-n", self.ns[1], "link", "set", self.dev[1], "up" if up else "down")

    def close(self) -> None:
        for ns in self.ns:  # deleting a namespace also deletes its end of the veth pair
            _ip("netns", "del", ns, check=False)

    def __enter__(self) -> "VethPair":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _remove_stale() -> None:
    """Delete namespaces of earlier test processes that are gone (a crashed run)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(NETNS_DIR):
            if not name.startswith(PREFIX):
                continue
            pid = name[len(PREFIX):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                _ip("netns", "del", name, check=False)


def enter(ns: str) -> None:
    """Move this process (its calling thread, and every thread it starts later) into `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetAgent(agents.Agent):
    """`agents.Agent` on a given local IP, linking to a peer at its own IP."""

    def __init__(self, conn, ip: str):
        super().__init__(conn)
        self.ip = ip

    def link_to(self, remote_cluster_id: int, remote_ip: str, port: int, timeout: int = 5000) -> dict:
        info = cluster_info(remote_cluster_id, port, remote_ip, self.ip)
        overall, per_cluster = self.dd.link_clusters([info], timeout)
        return {"overall": int(overall), "per": [int(c) for c in per_cluster]}

    def unlink_from(self, remote_cluster_id: int, remote_ip: str, port: int, force: bool = False,
                    timeout: int = 3000) -> dict:
        info = cluster_info(remote_cluster_id, port, remote_ip, self.ip)
        overall, per_cluster = self.dd.unlink_clusters([info], timeout, force=force)
        return {"overall": int(overall), "per": [int(c) for c in per_cluster]}

    def mooncake_endpoint(self) -> str:
        agent = self.dd._links.mooncake_agent  # noqa: SLF001 - tests may look inside
        return agent.endpoint if agent is not None else ""

    def peer_mooncake_endpoint(self, remote_cluster_id: int) -> str:
        return self.dd._links.get(remote_cluster_id).peer.mooncake_endpoint  # noqa: SLF001


def netns_agent(conn, ns: Optional[str], ip: str) -> None:
    """Child target: enter `ns` (None: stay), then serve `NetAgent` methods on `ip`."""
    if ns:
        enter(ns)
    agents.LOCAL_IP = ip  # Agent.init listens on LOCAL_IP
    instance = NetAgent(conn, ip)
    handlers = {name: getattr(instance, name) for name in dir(NetAgent)
                if not name.startswith("_") and callable(getattr(NetAgent, name))}
    try:
        serve(conn, handlers)
    finally:
        instance.finalize()
