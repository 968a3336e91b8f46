"""This engine's end of the `mooncake` transport: one Mooncake Transfer Engine, started lazily.

The agent starts at the first link that needs it (a peer on another host, or
`transfer_backend="mooncake"` on either side), in P2P-handshake mode: no metadata server; a peer
reaches it at `endpoint` ("ip:rpc_port"), which our own control plane hands over in the link
handshake. From then on every CPU memory block that peers may read or write is registered with
Mooncake: the pool arenas once, registered caches (`remote_accessible`) and stand-alone
allocations while they live. Mooncake itself refuses a peer's request outside registered memory;
our owner-side checks (`_serving`) come first, as for every transport.

Mooncake is an optional dependency, imported here only. Without it, the links and transfers
that need it fail with `LLM_FEATURE_NOT_ENABLED` naming the install; all else keeps working.

Device memory (CUDA / NPU) is never registered: that needs a Mooncake build with device support
(GPUDirect RDMA, Ascend transport) or staging through pinned host buffers; neither is in the
CPU wheel, so the transport refuses device memory instead of handing Mooncake device addresses.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from ...status import LLMStatusCode, fail

logger = logging.getLogger(__name__)

ENV_PROTOCOL = "LLM_DATADIST_TORCH_MOONCAKE_PROTOCOL"  # "tcp" (default) or "rdma"
ENV_DEVICES = "LLM_DATADIST_TORCH_MOONCAKE_DEVICES"    # RDMA device filter, e.g. "mlx5_0,mlx5_1"
KNOWN_PROTOCOLS = ("tcp", "rdma")
INSTALL_HINT = ('pip install "llm_datadist_torch[mooncake]" (the mooncake-transfer-engine-non-cuda '
                'wheel) and, on Debian/Ubuntu, apt-get install libibverbs1 libnl-3-200 '
                'libnl-route-3-200')
# Mooncake gives a stuck synchronous transfer up to MC_TRANSFER_TIMEOUT seconds (default 30,
# minimum 5) plus one second per GiB before it returns -1 by itself; its TCP sessions give up
# after MC_TCP_PROGRESS_TIMEOUT_SEC (default 30) without progress. Unset, both become
# max(5, sync_kv_timeout + 1 s) here.
MIN_MC_TIMEOUT_S = 5
_BUSY_RC = -7  # "overlapped memory region": the block lies in one registered already
# Mooncake's TCP transport fails a batch outright (no queueing) once about 2048 requests to one
# peer are pending (MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER + MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER,
# 1024 each by default): a transfer goes in batches of at most this many segments, and the
# calls to one peer share this budget.
MAX_PENDING_PER_PEER = 1024


def import_transfer_engine():
    """`mooncake.engine.TransferEngine`, or `LLM_FEATURE_NOT_ENABLED` saying how to install it."""
    # Mooncake logs every connection and handshake at INFO; a level the user set wins.
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:  # no wheel, or its libibverbs / libnl libraries are missing
        fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "the mooncake transport needs the Mooncake "
             "Transfer Engine: %s (import failed: %s)", INSTALL_HINT, exc)
    return TransferEngine


def protocol() -> str:
    value = os.environ.get(ENV_PROTOCOL, "").strip().lower() or "tcp"
    if value not in KNOWN_PROTOCOLS:
        logger.warning("%s=%r is not one of %s; passed to Mooncake as is", ENV_PROTOCOL, value,
                       KNOWN_PROTOCOLS)
    return value


# Destroying a TransferEngine takes about a second (it joins its service threads), so engines
# of finalized agents wait here, with no memory registered, for the next agent of this process
# on the same ip / protocol. They are never destroyed while a transfer may still run in them.
_idle_lock = threading.Lock()
_idle: Dict[Tuple[str, str, str], list] = {}
_leaked: list = []  # engines with abandoned transfers still running: kept alive, never reused


def _new_engine(ip: str, proto: str, devices: str, mc_timeout_s: int):
    """(TransferEngine, the MC_TRANSFER_TIMEOUT it runs with)."""
    with _idle_lock:
        pool = _idle.get((ip, proto, devices))
        if pool:
            return pool.pop()
    cls = import_transfer_engine()
    # These bound how long a stuck call (and its TCP session) lingers after we gave up on it.
    # Mooncake reads them from the environment (the second one whenever a connection opens), so
    # they stay set; values the user (or an earlier agent of this process) set win.
    names = ("MC_TRANSFER_TIMEOUT", "MC_TCP_PROGRESS_TIMEOUT_SEC")
    for name in names:
        os.environ.setdefault(name, str(mc_timeout_s))
    try:
        mc_timeout_s = max([MIN_MC_TIMEOUT_S] + [int(os.environ[name]) for name in names])
    except ValueError:
        mc_timeout_s = 30  # Mooncake's own default
    engine = cls()
    rc = engine.initialize(ip, "P2PHANDSHAKE", proto, devices)
    if rc != 0:
        fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "Mooncake Transfer Engine did not start on "
             "%s with protocol %r (rc %d); check %s and the address", ip, proto, rc, ENV_PROTOCOL)
    return engine, mc_timeout_s


class InFlight:
    """A Mooncake call running in its own thread; outlives the caller's wait after a timeout."""

    def __init__(self, fn: Optional[Callable[[], int]], nbytes: int, linger_s: float):
        self.fn = fn
        self.nbytes = nbytes
        self.abandoned = False  # the caller gave up: batches not yet started are skipped
        # By then Mooncake has returned by itself (its own timeout, plus a margin).
        self.ends_by = time.monotonic() + linger_s
        self.rc: Optional[int] = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: List[Callable[[], None]] = []

    def start(self) -> None:
        # Daemon: a call stuck in Mooncake must not hold up interpreter exit.
        threading.Thread(target=self._run, name="llm_datadist_torch-mooncake", daemon=True).start()

    def _run(self) -> None:
        try:
            self.rc = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self.error = exc
        with self._lock:
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def abandon(self) -> None:
        self.abandoned = True

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the call has returned (now, if it has)."""
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(callback)
                return
        callback()


class MooncakeAgent:
    """One Mooncake Transfer Engine per `Engine` (initialized `LLMDataDist`)."""

    def __init__(self, engine, ip: str):
        self._engine = engine
        self._lock = threading.Lock()
        self._closed = False
        self._calls: set = set()
        self._budgets: Dict[str, list] = {}  # target -> [Condition, requests still allowed]
        self._by_cache: Dict[int, List[int]] = {}  # cache id -> addresses registered for it
        self._arenas: List[int] = []               # pool arena addresses
        self._blocks: List[Tuple[int, int]] = []   # (start, end) of everything registered
        self.protocol = protocol()
        self._devices = os.environ.get(ENV_DEVICES, "")
        sync_s = engine.options.sync_kv_timeout_ms / 1000.0
        self._key = (ip, self.protocol, self._devices)
        self._te, self._mc_timeout_s = _new_engine(
            ip, self.protocol, self._devices, max(MIN_MC_TIMEOUT_S, int(math.ceil(sync_s)) + 1))
        self.endpoint = f"{ip}:{self._te.get_rpc_port()}"
        try:
            self._attach()
        except BaseException:
            with engine.table.lock:
                if getattr(engine, "memory_listener", None) is self:
                    engine.memory_listener = None
                self._unregister_all()
            self._release_engine()
            raise
        logger.info("cluster %d: Mooncake (%s) at %s", engine.cluster_id, self.protocol,
                    self.endpoint)

    # ---- memory --------------------------------------------------------------------------
    def _attach(self) -> None:
        """Register what exists now and follow what comes and goes (under the table lock, so
        no cache is added or freed in between)."""
        engine = self._engine
        with engine.table.lock:
            for pool in engine.pools.values():
                tensor = pool.arena.tensor
                if tensor is not None and tensor.device.type == "cpu" and tensor.numel():
                    if self._register(tensor.data_ptr(), tensor.numel()):
                        self._arenas.append(tensor.data_ptr())
            for entry in engine.table.entries():
                self.memory_added(entry)
            if engine.fences is not None:  # peers read the fence words of our caches too
                self.area_added(engine.fences.region.address, engine.fences.region.nbytes)
            engine.memory_listener = self

    def memory_added(self, entry) -> None:
        """A cache peers may access now exists (called under the table lock)."""
        if not entry.remote_accessible or entry.cache_id in self._by_cache:
            return
        added = []
        for raw in entry.raw:
            if raw.device.type != "cpu" or not raw.numel():
                continue  # device memory is refused by the transport, never registered
            start = raw.data_ptr()
            if self._covered(start, raw.numel()):
                continue  # carved from a pool arena, registered with it
            if self._register(start, raw.numel()):
                added.append(start)
        self._by_cache[entry.cache_id] = added

    def memory_removed(self, cache_id: int) -> None:
        """The memory of `cache_id` is about to be freed (called under the table lock)."""
        for address in self._by_cache.pop(cache_id, []):
            self._unregister(address)

    def area_added(self, address: int, nbytes: int) -> None:
        """A staging area peers read or write (idempotent; called under the table lock)."""
        if not self._covered(address, nbytes):
            self._register(address, nbytes)

    def area_removed(self, address: int) -> None:
        """A staging area is about to be freed (called under the table lock)."""
        if any(block[0] == address for block in self._blocks):
            self._unregister(address)

    def _covered(self, start: int, nbytes: int) -> bool:
        return any(lo <= start and start + nbytes <= hi for lo, hi in self._blocks)

    def _register(self, address: int, nbytes: int) -> bool:
        rc = self._te.register_memory(address, nbytes)
        if rc != 0:
            logger.error("Mooncake cannot register 0x%x (+%d bytes), rc %d%s: peers cannot reach "
                         "it through mooncake", address, nbytes, rc,
                         " (overlaps a registered block)" if rc == _BUSY_RC else "")
            return False
        self._blocks.append((address, address + nbytes))
        return True

    def _unregister(self, address: int) -> None:
        self._blocks = [block for block in self._blocks if block[0] != address]
        rc = self._te.unregister_memory(address)
        if rc != 0:
            logger.warning("Mooncake unregister of 0x%x returned %d", address, rc)

    # ---- transfers -----------------------------------------------------------------------
    def start_call(self, target: str, local: List[int], remote: List[int], lengths: List[int],
                   to_remote: bool) -> InFlight:
        """Start a synchronous Mooncake transfer (batches of at most MAX_PENDING_PER_PEER
        segments, one after the other) in a thread of its own."""
        nbytes = sum(lengths)
        batches = -(-len(lengths) // MAX_PENDING_PER_PEER)
        linger_s = batches * (self._mc_timeout_s + 1.0) + nbytes / 2**30 + 5.0
        call = InFlight(None, nbytes, linger_s)
        call.fn = lambda: self._run_batches(call, target, local, remote, lengths, to_remote)
        with self._lock:
            if self._closed:
                fail(LLMStatusCode.LLM_NOT_YET_LINK, "the Mooncake agent of cluster %d is closed",
                     self._engine.cluster_id)
            self._calls.add(call)
            self._budgets.setdefault(target, [threading.Condition(), MAX_PENDING_PER_PEER])
        call.add_done_callback(lambda: self._forget(call))
        call.start()
        return call

    def _run_batches(self, call: InFlight, target: str, local: List[int], remote: List[int],
                     lengths: List[int], to_remote: bool) -> int:
        """0, or the first failing batch's Mooncake result (-1); -2 if abandoned before it ran."""
        transfer = self._te.batch_transfer_sync_write if to_remote else self._te.batch_transfer_sync_read
        cond, _ = budget = self._budgets[target]
        for start in range(0, len(lengths), MAX_PENDING_PER_PEER):
            end = min(start + MAX_PENDING_PER_PEER, len(lengths))
            count = end - start
            with cond:
                while budget[1] < count:
                    if call.abandoned:
                        return -2
                    cond.wait(0.05)
                if call.abandoned:
                    return -2
                budget[1] -= count
            try:
                rc = transfer(target, local[start:end], remote[start:end], lengths[start:end])
            finally:
                with cond:
                    budget[1] += count
                    cond.notify_all()
            if rc != 0:
                return rc
        return 0

    def _forget(self, call: InFlight) -> None:
        with self._lock:
            self._calls.discard(call)

    # ---- shutdown ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop following memory, wait (bounded) for calls still in Mooncake, release the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            calls = list(self._calls)
        with self._engine.table.lock:
            if getattr(self._engine, "memory_listener", None) is self:
                self._engine.memory_listener = None
        for call in calls:
            call.done.wait(max(0.0, call.ends_by - time.monotonic()))
        if any(not call.done.is_set() for call in calls):
            # Destroying the engine or unregistering under a running call could crash it.
            logger.error("cluster %d: %d Mooncake transfer(s) still running after their time "
                         "limit; their engine is left alive", self._engine.cluster_id,
                         sum(not call.done.is_set() for call in calls))
            _leaked.append(self._te)
            self._te = None
            return
        with self._engine.table.lock:
            self._unregister_all()
        self._release_engine()

    def _unregister_all(self) -> None:
        for addresses in self._by_cache.values():
            for address in addresses:
                self._unregister(address)
        self._by_cache.clear()
        for address in self._arenas:
            self._unregister(address)
        self._arenas = []

    def _release_engine(self) -> None:
        engine, self._te = self._te, None
        if engine is not None:
            with _idle_lock:
                _idle.setdefault(self._key, []).append((engine, self._mc_timeout_s))


__all__ = ["MooncakeAgent", "InFlight", "import_transfer_engine", "INSTALL_HINT", "ENV_PROTOCOL",
           "ENV_DEVICES"]
