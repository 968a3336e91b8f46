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
                                Placement, TransferConfig, TransferWithCacheKeyConfig)

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
