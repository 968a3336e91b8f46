"""What runs inside the spawned children: one scriptable `LLMDataDist` per process.

`agent(conn)` serves the handlers below through `harness.serve`; a test drives a prompt and a
decoder with `child.call("init", ...)`, `child.call("pull_blocks", ...)`, ... Cache contents are
deterministic byte patterns (`tensor_pattern(seed, tensor_index, nbytes)`), so the parent can compute
exactly what every byte of a cache must be after a transfer and compare with `read`.

Keys travel as plain tuples made by `key(...)`; caches are named by strings chosen by the test.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
import time
from typing import Dict, List, Optional

import torch

from llm_datadist_torch import (BlocksCacheKey, CacheDesc, CacheKey, CacheKeyByIdAndIndex, DataType,
                                LayerSynchronizer, LLMConfig, LLMDataDist, LLMException, LLMRole,
                                LLMStatusCode, Placement, TransferConfig,
                                TransferWithCacheKeyConfig)

from harness import serve
from helpers import cluster_info, pattern, shm_files

DTYPE = DataType.DT_FLOAT16
TORCH_DTYPE = torch.float16
ITEMSIZE = 2
LOCAL_IP = "127.0.0.1"


# ---- shared by parent and children --------------------------------------------------------
_cluster_ids = itertools.count(10_000 + (os.getpid() % 10_000) * 1_000)


def new_cluster_id() -> int:
    """A cluster id no other cluster of this test session uses."""
    return next(_cluster_ids)


def tensor_pattern(seed: int, index: int, nbytes: int) -> torch.Tensor:
    """Deterministic bytes for tensor `index` of a cache filled with `seed`."""
    return pattern(nbytes, seed * 1009 + index)


def tensor_bytes(shape) -> int:
    return math.prod(shape) * ITEMSIZE


def expected(seed: int, num_tensors: int, shape) -> List[torch.Tensor]:
    """Initial contents of a cache, one [slots, bytes per slot] uint8 tensor per cache tensor."""
    nbytes = tensor_bytes(shape)
    return [tensor_pattern(seed, i, nbytes).view(shape[0], -1).clone() for i in range(num_tensors)]


def as_slots(raw: List[bytes], slots: int) -> List[torch.Tensor]:
    return [torch.frombuffer(bytearray(b), dtype=torch.uint8).view(slots, -1) for b in raw]


def key(kind: str, *args, **kwargs) -> tuple:
    """A picklable description of a key: key("CacheKey", prompt_cluster_id=1, req_id=2)."""
    return (kind, args, kwargs)


def _make_key(spec):
    kind, args, kwargs = spec
    return {"CacheKey": CacheKey, "CacheKeyByIdAndIndex": CacheKeyByIdAndIndex,
            "BlocksCacheKey": BlocksCacheKey}[kind](*args, **kwargs)


# ---- the child ------------------------------------------------------------------------------
class Agent:
    def __init__(self, conn):
        self.conn = conn
        self.dd: Optional[LLMDataDist] = None
        self.caches: Dict[str, object] = {}
        self.user_tensors: Dict[str, List[torch.Tensor]] = {}  # registered memory we own
        self.series = None
        self.loops: Dict[str, tuple] = {}  # start_loop: id -> (threads, stop, state, lock)
        self.guards: Dict[str, tuple] = {}  # memory given back, filled with a guard byte

    @property
    def manager(self):
        return self.dd.cache_manager

    # -- lifecycle
    def init(self, cluster_id: int, role: str = "PROMPT", listen=None, remote_accessible=None,
             transfer_backend: Optional[str] = None, sync_kv_timeout: Optional[int] = None,
             mem_pool: Optional[int] = 16 << 20, host_pool: Optional[int] = None,
             switch_role: bool = False) -> dict:
        """Initialize; `listen` = True (port 0, reported back) or a port number."""
        config = LLMConfig()
        config.device_id = 0
        config.enable_cache_manager = True
        if remote_accessible is not None:
            config.enable_remote_cache_accessible = remote_accessible
        if listen is not None and listen is not False:
            config.listen_ip_info = f"{LOCAL_IP}:{0 if listen is True else int(listen)}"
        if transfer_backend is not None:
            config.transfer_backend = transfer_backend
        if sync_kv_timeout is not None:
            config.sync_kv_timeout = sync_kv_timeout
        if mem_pool:
            config.mem_pool_cfg = '{"memory_size": %d}' % mem_pool
        if host_pool:
            config.host_mem_pool_cfg = '{"memory_size": %d}' % host_pool
        if switch_role:
            config.enable_switch_role = True
        self.dd = LLMDataDist(LLMRole[role], cluster_id)
        self.dd.init(config.generate_options())
        return {"pid": os.getpid(), "port": self.port()}

    def port(self) -> Optional[int]:
        """The port this cluster listens on (the real one when it asked for port 0)."""
        listening = self.dd._links.listening  # noqa: SLF001 - tests may look inside
        return int(listening.rsplit(":", 1)[1]) if listening else None

    def finalize(self) -> None:
        if self.dd is not None:
            self.dd.finalize()
        self.caches.clear()

    # -- caches
    def allocate(self, name: str, num_tensors: int, shape, seed: int, keys=(), blocks: bool = False,
                 model_id: Optional[int] = None, placement: str = "DEVICE") -> int:
        desc = CacheDesc(num_tensors, list(shape), DTYPE, Placement[placement])
        if blocks:
            bkey = None if model_id is None else BlocksCacheKey(self.dd.cluster_id, model_id)
            cache = self.manager.allocate_blocks_cache(desc, bkey)
        else:
            cache = self.manager.allocate_cache(desc, [_make_key(k) for k in keys])
        self.caches[name] = cache
        self.fill(name, seed)
        return cache.cache_id

    def register(self, name: str, num_tensors: int, shape, seed: int, blocks: bool = True,
                 model_id: Optional[int] = None, keys=(), remote_accessible=None) -> int:
        """Register caller-owned torch tensors (vllm-ascend: K0, V0, K1, V1, ... per layer)."""
        tensors = [torch.empty(list(shape), dtype=TORCH_DTYPE) for _ in range(num_tensors)]
        self.user_tensors[name] = tensors
        desc = CacheDesc(num_tensors, list(shape), DTYPE, Placement.DEVICE)
        addrs = [t.data_ptr() for t in tensors]
        if blocks:
            bkey = None if model_id is None else BlocksCacheKey(self.dd.cluster_id, model_id)
            cache = self.manager.register_blocks_cache(desc, addrs, bkey, remote_accessible)
        else:
            cache = self.manager.register_cache(desc, addrs, [_make_key(k) for k in keys],
                                                remote_accessible)
        self.caches[name] = cache
        self.fill(name, seed)
        return cache.cache_id

    def _tensors(self, name: str) -> List[torch.Tensor]:
        if name in self.user_tensors:
            return self.user_tensors[name]  # what the caller's own tensors see
        cache = self.caches[name]
        return [self.manager.get_cache_tensors(cache, i)[0]
                for i in range(cache.cache_desc.num_tensors)]

    def fill(self, name: str, seed: int) -> None:
        for index, tensor in enumerate(self._tensors(name)):
            raw = tensor.view(-1).view(torch.uint8)
            raw.copy_(tensor_pattern(seed, index, raw.numel()))

    def read(self, name: str) -> List[bytes]:
        return [t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in self._tensors(name)]

    def deallocate(self, name: str) -> None:
        cache = self.caches.pop(name)
        if cache.is_blocks_cache:
            self.manager.deallocate_blocks_cache(cache)
        else:
            self.manager.deallocate_cache(cache)

    def unregister(self, name: str) -> None:
        self.manager.unregister_cache(self.caches.pop(name).cache_id)
        self.user_tensors.pop(name, None)

    def remove_cache_key(self, spec) -> None:
        self.manager.remove_cache_key(_make_key(spec))

    # -- links
    def link(self, remote_cluster_id: int, port: int, timeout: int = 5000) -> dict:
        info = cluster_info(remote_cluster_id, port, LOCAL_IP, LOCAL_IP)
        start = time.perf_counter()
        overall, per_cluster = self.dd.link_clusters([info], timeout)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        return {"overall": int(overall), "per": [int(c) for c in per_cluster], "ms": elapsed_ms}

    def link_many(self, peers: List[tuple], timeout: int = 5000) -> dict:
        """One link_clusters call for several (remote_cluster_id, port) servers."""
        infos = [cluster_info(remote_cluster_id, port, LOCAL_IP, LOCAL_IP)
                 for remote_cluster_id, port in peers]
        overall, per_cluster = self.dd.link_clusters(infos, timeout)
        return {"overall": int(overall), "per": [int(c) for c in per_cluster]}

    def transports_used(self, remote_cluster_id: int) -> List[str]:
        """Names of the transports the link to `remote_cluster_id` has used so far."""
        link = self.dd._links.get(remote_cluster_id)  # noqa: SLF001 - tests may look inside
        with link.lock:
            return sorted(link.transports)

    def unlink(self, remote_cluster_id: int, port: Optional[int] = None, force: bool = False,
               timeout: int = 3000) -> dict:
        info = cluster_info(remote_cluster_id, port, LOCAL_IP, LOCAL_IP)
        overall, per_cluster = self.dd.unlink_clusters([info], timeout, force=force)
        return {"overall": int(overall), "per": [int(c) for c in per_cluster]}

    def link_cycles(self, remote_cluster_id: int, port: int, count: int) -> List[float]:
        """`count` link/unlink cycles; the link_clusters times in ms."""
        times = []
        for _ in range(count):
            result = self.link(remote_cluster_id, port)
            assert result["overall"] == 0, result
            times.append(result["ms"])
            assert self.unlink(remote_cluster_id, port)["overall"] == 0
        return times

    def switch_role(self, role: str, listen=None) -> Optional[int]:
        """switch_role(role[, {"llm.listenIpInfo": ...}]); the port listened on afterwards."""
        options = None
        if listen is not None:
            options = {"llm.listenIpInfo": f"{LOCAL_IP}:{0 if listen is True else int(listen)}"}
        self.dd.switch_role(LLMRole[role], options)
        return self.port()

    # -- two-sided links (link / query_register_mem_status / unlink)
    def link_domain(self, comm_name: str, cluster_rank_info: Dict[int, int], rank_table: str) -> int:
        return self.dd.link(comm_name, cluster_rank_info, rank_table)

    def wait_domain(self, comm_id: int, timeout_s: float = 10.0) -> dict:
        """Poll query_register_mem_status until it leaves PREPARING (bounded)."""
        start = time.monotonic()
        seen = []
        while True:
            status = self.dd.query_register_mem_status(comm_id)
            if not seen or seen[-1] != status.name:
                seen.append(status.name)
            if status.name != "PREPARING" or time.monotonic() - start > timeout_s:
                return {"statuses": seen, "ms": (time.monotonic() - start) * 1e3}
            time.sleep(0.01)

    def unlink_domain(self, comm_id: int) -> None:
        self.dd.unlink(comm_id)

    # -- transfers (each returns its duration in seconds)
    def pull_cache(self, spec, name: str, batch_index: int = 0, size: int = -1, **kwargs) -> float:
        start = time.perf_counter()
        self.manager.pull_cache(_make_key(spec), self.caches[name], batch_index, size, **kwargs)
        return time.perf_counter() - start

    def pull_blocks(self, spec, name: str, src_blocks=(), dst_blocks=(), **kwargs) -> float:
        start = time.perf_counter()
        self.manager.pull_blocks(_make_key(spec), self.caches[name], src_blocks, dst_blocks, **kwargs)
        return time.perf_counter() - start

    def push_cache(self, spec, name: str, *args, **kwargs) -> float:
        """push_cache(key, cache, *args, **kwargs): positional arguments pass through as given."""
        start = time.perf_counter()
        self.manager.push_cache(_make_key(spec), self.caches[name], *args, **kwargs)
        return time.perf_counter() - start

    def push_blocks(self, spec, name: str, *args, **kwargs) -> float:
        """push_blocks(key, cache, *args, **kwargs): positional arguments pass through as given."""
        start = time.perf_counter()
        self.manager.push_blocks(_make_key(spec), self.caches[name], *args, **kwargs)
        return time.perf_counter() - start

    def pull_blocks_timed(self, spec, name: str, src_blocks, dst_blocks, count: int) -> List[float]:
        """`count` identical pulls; their durations in ms."""
        times = []
        for _ in range(count):
            times.append(self.pull_blocks(spec, name, src_blocks, dst_blocks) * 1e3)
        return times

    def pull_threads(self, spec, name: str, jobs: List[List[tuple]]) -> List[str]:
        """One thread per entry of `jobs`, each running its (src_blocks, dst_blocks) pulls, all
        released at once; the errors (empty when all succeeded)."""
        errors: List[str] = []
        barrier = threading.Barrier(len(jobs))

        def run(pulls):
            try:
                barrier.wait(10)
                for src_blocks, dst_blocks in pulls:
                    self.manager.pull_blocks(_make_key(spec), self.caches[name], src_blocks, dst_blocks)
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                errors.append(repr(exc))

        threads = [threading.Thread(target=run, args=(pulls,)) for pulls in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads), "a pulling thread hangs"
        return errors

    # -- a long series of pulls in the background (for killing the peer in the middle)
    def start_series(self, spec, name: str, src_blocks, dst_blocks, max_s: float = 30.0) -> None:
        state = {"count": 0, "error": None}

        def run():
            deadline = time.monotonic() + max_s
            while time.monotonic() < deadline:
                start = time.monotonic()
                try:
                    self.manager.pull_blocks(_make_key(spec), self.caches[name], src_blocks, dst_blocks)
                except LLMException as exc:
                    state["error"] = {"status_code": int(exc.status_code), "message": str(exc),
                                      "call_s": time.monotonic() - start}
                    return
                state["count"] += 1
            state["error"] = {"status_code": None, "message": "no error before max_s", "call_s": 0}

        thread = threading.Thread(target=run, daemon=True)
        self.series = (thread, state)
        thread.start()

    def series_count(self) -> int:
        return self.series[1]["count"]

    def series_result(self, timeout_s: float) -> dict:
        thread, state = self.series
        thread.join(timeout_s)
        assert not thread.is_alive(), f"the pull series still runs after {timeout_s} s"
        return dict(state)

    def addresses(self, name: str) -> List[int]:
        return list(self.caches[name].tensor_addrs)

    # -- a layer-wise push (transfer_cache_async) while "the model" writes the layers
    def transfer_layers(self, name: str, configs: list, seed: int, src_block_indices=None,
                        dst_block_indices=None, dst_block_memory_size=None,
                        refuse_layer: Optional[int] = None, raise_layer: Optional[int] = None) -> dict:
        """`transfer_cache_async` of cache `name`, started before its layers are computed: the
        K and V of layer L get `tensor_pattern(seed, ...)` only after the start, and the synchronizer
        lets layer L go once it is written, so only a push that waited can deliver those bytes.

        `configs`: ("addrs", cluster_id, dst_addrs, src_range, batch) or
        ("key", key spec, src_range, dst_range, batch); ranges as (start, stop) or None.
        The synchronizer refuses `refuse_layer` and raises at `raise_layer`. Returns the
        results, the synchronize() codes and the layers the synchronizer was asked for.
        """
        cache = self.caches[name]
        layers = cache.cache_desc.num_tensors // 2
        written = [threading.Event() for _ in range(layers)]
        asked: List[int] = []

        class ModelLayers(LayerSynchronizer):
            def synchronize_layer(self, layer_index, timeout_in_millis):
                asked.append(layer_index)
                if layer_index == raise_layer:
                    raise RuntimeError("synchronizer failure (test)")
                return layer_index != refuse_layer and written[layer_index].wait(30)

        def as_range(value):
            return None if value is None else range(*value)

        made = []
        for kind, target, *rest in configs:
            if kind == "addrs":
                made.append(TransferConfig(target, list(rest[0]), as_range(rest[1]), rest[2]))
            else:
                made.append(TransferWithCacheKeyConfig(_make_key(target), as_range(rest[0]),
                                                       as_range(rest[1]), rest[2]))
        task = self.manager.transfer_cache_async(cache, ModelLayers(), made, src_block_indices,
                                                 dst_block_indices, dst_block_memory_size)
        early = task.synchronize(50)  # the worker waits for layer data nobody has written yet
        tensors = self._tensors(name)
        for layer in range(layers):
            for index in (2 * layer, 2 * layer + 1):
                raw = tensors[index].view(-1).view(torch.uint8)
                raw.copy_(tensor_pattern(seed, index, raw.numel()))
            written[layer].set()
        final = task.synchronize(60_000)
        results = task.get_results(60_000)
        return {"early": int(early), "final": int(final), "asked": asked,
                "results": [None if r is None else int(r) for r in results],
                "ranges": [(c.src_layer_range.start, c.src_layer_range.stop) for c in made]}

    # -- resources
    def resources(self) -> dict:
        return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
                "shm": shm_files(os.getpid())}

    def settle(self, seconds: float) -> None:
        time.sleep(seconds)

    # -- fault and soak tests (test_faults.py, test_soak.py) ----------------------------------
    def proc_stats(self) -> dict:
        """fds, OS threads (native ones included), Python threads, RSS in KiB and the library's
        /dev/shm files of this process."""
        rss_kb = 0
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
        return {"fds": len(os.listdir("/proc/self/fd")),
                "tasks": len(os.listdir("/proc/self/task")),
                "threads": threading.active_count(), "rss_kb": rss_kb,
                "shm": shm_files(os.getpid())}

    def now(self) -> float:
        """time.monotonic() here (CLOCK_MONOTONIC: the parent's clock too)."""
        return time.monotonic()

    def _rows(self, name: str) -> List[torch.Tensor]:
        """Tensor views [slots, bytes per slot] (uint8) of cache `name`, taken now."""
        return [t.reshape(t.shape[0], -1).view(torch.uint8) for t in self._tensors(name)]

    def start_loop(self, loop_id: str, jobs: List[List[dict]], max_s: float = 30.0,
                   stop_on_error: bool = False, pause_s: float = 0.0) -> None:
        """One thread per entry of `jobs`, each running its ops round robin until `stop_loop`,
        `max_s`, or (with `stop_on_error`) its first error. The manager and the local views are
        taken once, at the start (a thread that keeps a CacheManager across `finalize`).

        An op: {"op": "pull_blocks" | "pull_cache" | "push_blocks" | "push_cache", "spec": key
        spec, "cache": local cache name, "args": [...], "kwargs": {...}} and, for a checked pull,
        "expect": {"seed": the owner's fill seed, "shape": the owner's cache shape, "tensors":
        [(remote tensor, local tensor), ...], "rows": [(remote row, local row), ...]}: the local
        rows are poisoned (0x5A) before the call and compared with the owner's bytes after a
        success. Everything is counted: successes, wrong bytes reported as success ("bad"),
        errors by status name, untyped exceptions, the first error with its monotonic time,
        the longest call.
        """
        manager = self.manager
        stop = threading.Event()
        lock = threading.Lock()
        state = {"count": 0, "ok": 0, "bad": 0, "bad_detail": [], "errors": {}, "untyped": [],
                 "first_error": None, "max_call_s": 0.0, "max_call_op": None, "last_ok_t": None,
                 "per_op_ok": {}}
        prepared = []
        for ops in jobs:
            mine = []
            for op in ops:
                entry = dict(op)
                entry["key"] = _make_key(op["spec"])
                entry["cache_obj"] = self.caches[op["cache"]]
                expect = op.get("expect")
                if expect is not None:
                    local = self._rows(op["cache"])
                    slots = expect["shape"][0]
                    remote = [tensor_pattern(expect["seed"], r, tensor_bytes(expect["shape"]))
                              .view(slots, -1) for r, _ in expect["tensors"]]
                    entry["check"] = [(remote[k][src_row], local[l][dst_row])
                                      for k, (_, l) in enumerate(expect["tensors"])
                                      for src_row, dst_row in expect["rows"]]
                mine.append(entry)
            prepared.append(mine)

        def note_error(exc, label, started, call_s):
            code = getattr(exc, "status_code", None)
            with lock:
                if isinstance(exc, LLMException) and code is not None:
                    name = LLMStatusCode(int(code)).name
                    state["errors"][name] = state["errors"].get(name, 0) + 1
                else:
                    name = None
                    if len(state["untyped"]) < 5:
                        state["untyped"].append(f"{label}: {type(exc).__name__}: {exc}")
                if state["first_error"] is None:
                    state["first_error"] = {"status": name, "exc_type": type(exc).__name__,
                                            "message": str(exc)[:300], "op": label,
                                            "t": time.monotonic(), "started": started,
                                            "call_s": call_s}

        def run(ops):
            deadline = time.monotonic() + max_s
            index = 0
            while not stop.is_set() and time.monotonic() < deadline:
                entry = ops[index % len(ops)]
                index += 1
                label = f"{entry['op']}:{entry['cache']}"
                for want, have in entry.get("check", ()):
                    have.fill_(0x5A)
                started = time.monotonic()
                try:
                    getattr(manager, entry["op"])(entry["key"], entry["cache_obj"],
                                                  *entry.get("args", ()), **entry.get("kwargs", {}))
                except Exception as exc:  # noqa: BLE001 - counted, the parent judges
                    call_s = time.monotonic() - started
                    note_error(exc, label, started, call_s)
                    with lock:
                        state["count"] += 1
                        if call_s > state["max_call_s"]:
                            state["max_call_s"], state["max_call_op"] = call_s, label
                    if stop_on_error:
                        return
                    if pause_s:
                        time.sleep(pause_s)
                    continue
                call_s = time.monotonic() - started
                wrong = [k for k, (want, have) in enumerate(entry.get("check", ()))
                         if not torch.equal(want, have)]
                with lock:
                    state["count"] += 1
                    if call_s > state["max_call_s"]:
                        state["max_call_s"], state["max_call_op"] = call_s, label
                    if wrong:
                        state["bad"] += 1
                        if len(state["bad_detail"]) < 5:
                            state["bad_detail"].append(f"{label}: {len(wrong)} rows differ "
                                                       f"(first row pair {wrong[0]})")
                    else:
                        state["ok"] += 1
                        state["last_ok_t"] = time.monotonic()
                        state["per_op_ok"][label] = state["per_op_ok"].get(label, 0) + 1
                if pause_s:
                    time.sleep(pause_s)

        threads = [threading.Thread(target=run, args=(ops,), daemon=True,
                                    name=f"test-loop-{loop_id}-{n}")
                   for n, ops in enumerate(prepared)]
        self.loops[loop_id] = (threads, stop, state, lock)
        for thread in threads:
            thread.start()

    def loop_status(self, loop_id: str) -> dict:
        threads, _, state, lock = self.loops[loop_id]
        with lock:
            return {**state, "alive": sum(t.is_alive() for t in threads)}

    def stop_loop(self, loop_id: str, timeout_s: float = 30.0) -> dict:
        """Stop the loop and wait for its threads (bounded); its state and how many still run."""
        threads, stop, state, lock = self.loops.pop(loop_id)
        stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        with lock:
            return {**state, "alive": sum(t.is_alive() for t in threads),
                    "join_s": timeout_s - max(deadline - time.monotonic(), 0)}

    def wait_loop(self, loop_id: str, timeout_s: float) -> dict:
        """Wait for a loop that ends by itself (stop_on_error, max_s); as `stop_loop` if not."""
        threads, _, _, _ = self.loops[loop_id]
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        return self.stop_loop(loop_id, 0.0)

    def unregister_keep(self, name: str, guard: int = 0xEE) -> dict:
        """unregister_cache, then, once it returned, the caller's memory is "given back": fill it
        with `guard` at once (kept here for `check_guard`)."""
        tensors = self.user_tensors[name]
        start = time.monotonic()
        self.unregister(name)
        returned = time.monotonic()
        for tensor in tensors:
            tensor.view(-1).view(torch.uint8).fill_(guard)
        self.guards[name] = (tensors, guard)
        return {"call_s": returned - start, "t": returned}

    def deallocate_scribble(self, name: str, guard: int = 0xEE, within_s: float = 5.0) -> dict:
        """deallocate the pool cache `name`, then allocate unkeyed caches of the same description
        until they cover the memory it had (first fit hands it out again once it is really
        free), each filled with `guard` at once; caches that land elsewhere are dropped again."""
        cache = self.caches[name]
        old = set(cache.tensor_addrs)
        desc = cache.cache_desc
        fresh = CacheDesc(desc.num_tensors, list(desc.shape), desc.data_type, desc.placement)
        allocate = (self.manager.allocate_blocks_cache if cache.is_blocks_cache
                    else self.manager.allocate_cache)
        start = time.monotonic()
        self.deallocate(name)
        returned = time.monotonic()
        covered, guarded, elsewhere = set(), [], []
        deadline = returned + within_s
        while not old <= covered and time.monotonic() < deadline:
            try:
                scribble = allocate(fresh)
            except LLMException:  # full: the freed memory is still held (peers being told)
                time.sleep(0.002)
                continue
            views = [self.manager.get_cache_tensors(scribble, i)[0].view(-1).view(torch.uint8)
                     for i in range(desc.num_tensors)]
            for view in views:
                view.fill_(guard)
            hit = old & set(scribble.tensor_addrs)
            if hit:
                covered |= hit
                guarded.append((scribble, views))
            else:
                elsewhere.append(scribble)
                if len(elsewhere) % 8 == 0:
                    time.sleep(0.002)
        reused_s = time.monotonic() - returned
        for scribble in elsewhere:
            self.manager.deallocate_blocks_cache(scribble) if scribble.is_blocks_cache \
                else self.manager.deallocate_cache(scribble)
        for index, (scribble, _) in enumerate(guarded):
            self.caches[f"{name}.scribble{index}"] = scribble
        self.guards[name] = ([v for _, views in guarded for v in views], guard)
        return {"call_s": returned - start, "t": returned, "reused": old <= covered,
                "reused_s": reused_s}

    def guard_user_tensors(self, name: str, guard: int = 0xEE) -> None:
        """Fill the caller-owned tensors of `name` (registered earlier; e.g. after finalize)."""
        tensors = self.user_tensors[name]
        for tensor in tensors:
            tensor.view(-1).view(torch.uint8).fill_(guard)
        self.guards[name] = (tensors, guard)

    def check_guard(self, name: str) -> int:
        """How many bytes of the memory guarded by `unregister_keep`/`deallocate_scribble`/
        `guard_user_tensors` are no longer the guard byte."""
        tensors, guard = self.guards[name]
        return int(sum((t.reshape(-1).view(torch.uint8) != guard).sum() for t in tensors))

    def keyed_batch(self, names: List[str], num_tensors: int, shape, seeds: List[int],
                    req_ids: List[List[int]], deallocate: bool = True) -> None:
        """Allocate one contiguous cache per name, its slots bound to CacheKey(this cluster,
        req_ids[i][slot]), filled with seeds[i]; `deallocate`: then drop the handle at once (the
        keys keep the cache, as the v1 connector does)."""
        for name, seed, ids in zip(names, seeds, req_ids):
            self.allocate(name, num_tensors, shape, seed,
                          keys=[key("CacheKey", prompt_cluster_id=self.dd.cluster_id, req_id=r)
                                for r in ids])
            if deallocate:
                self.deallocate(name)

    def remove_keys_jittered(self, req_ids: List[int], max_delay_s: float, rng_seed: int,
                             scribble_shape=None, num_tensors: int = 0, guard: int = 0xEE) -> dict:
        """remove_cache_key of every request id, in the given order, after random pauses of up
        to `max_delay_s`; with `scribble_shape`, after each removal an unkeyed cache of that
        shape is allocated and filled with `guard` (memory a retired cache gave back is written
        at once). The scribbles are deallocated at the end."""
        import random
        rng = random.Random(rng_seed)
        scribbles = []
        removed_at = []
        for req_id in req_ids:
            time.sleep(rng.random() * max_delay_s)
            self.manager.remove_cache_key(
                _make_key(key("CacheKey", prompt_cluster_id=self.dd.cluster_id, req_id=req_id)))
            removed_at.append(time.monotonic())
            if scribble_shape is not None:
                try:
                    cache = self.manager.allocate_cache(
                        CacheDesc(num_tensors, list(scribble_shape), DTYPE, Placement.DEVICE))
                except LLMException:
                    continue  # the pool is full: what is left is still held (fine)
                for index in range(num_tensors):
                    view = self.manager.get_cache_tensors(cache, index)[0]
                    view.view(-1).view(torch.uint8).fill_(guard)
                scribbles.append(cache)
        for cache in scribbles:
            self.manager.deallocate_cache(cache)
        return {"scribbles": len(scribbles)}

    def pull_keys(self, owner_cluster: int, name: str, jobs: List[tuple], owner_shape,
                  num_tensors: int, dst_slot: int = 0) -> dict:
        """pull_cache(CacheKey(owner_cluster, req_id), name, dst_slot) for each (req_id, seed,
        slot) of `jobs`: the destination slot is poisoned first, and a success must bring the
        owner's slot `slot` of a cache filled with `seed`, byte for byte. Counts the outcomes."""
        rows = self._rows(name)
        cache = self.caches[name]
        manager = self.manager
        nbytes = tensor_bytes(owner_shape)
        out = {"ok": 0, "bad": 0, "bad_detail": [], "errors": {}, "untyped": [], "max_call_s": 0.0,
               "max_error_s": 0.0}
        for req_id, seed, slot in jobs:
            for row in rows:
                row[dst_slot].fill_(0x5A)
            started = time.monotonic()
            try:
                manager.pull_cache(CacheKey(owner_cluster, req_id), cache, dst_slot)
            except LLMException as exc:
                name_ = LLMStatusCode(int(exc.status_code)).name
                if "went away" in str(exc):  # resolved, then gone before the fence was read again
                    name_ += " (after resolve)"
                out["errors"][name_] = out["errors"].get(name_, 0) + 1
                out["max_error_s"] = max(out["max_error_s"], time.monotonic() - started)
                continue
            except Exception as exc:  # noqa: BLE001 - reported
                out["untyped"].append(f"req {req_id}: {type(exc).__name__}: {exc}")
                out["max_error_s"] = max(out["max_error_s"], time.monotonic() - started)
                continue
            finally:
                out["max_call_s"] = max(out["max_call_s"], time.monotonic() - started)
            wrong = []
            for index, row in enumerate(rows):
                want = tensor_pattern(seed, index, nbytes).view(owner_shape[0], -1)[slot]
                if not torch.equal(row[dst_slot][:want.numel()], want):
                    wrong.append(index)
            if wrong:
                out["bad"] += 1
                if len(out["bad_detail"]) < 5:
                    sample = rows[wrong[0]][dst_slot][:8].tolist()
                    out["bad_detail"].append(f"req {req_id}: tensors {wrong} differ, first bytes "
                                             f"{sample}")
            else:
                out["ok"] += 1
        return out


def agent(conn) -> None:
    """Child target: serve `Agent` methods until the parent says stop, then finalize."""
    instance = Agent(conn)
    handlers = {name: getattr(instance, name) for name, value in vars(Agent).items()
                if not name.startswith("_") and callable(value)}
    try:
        serve(conn, handlers)
    finally:
        instance.finalize()


__all__ = ["Agent", "agent", "as_slots", "expected", "key", "new_cluster_id", "tensor_bytes",
           "tensor_pattern"]
