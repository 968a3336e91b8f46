"""The `transfer` suite: pull_blocks / pull_cache between two clusters, per transport.

A prompt cluster (a spawned process, or the same process for `local`) owns, for every block
size, a blocks cache and a contiguous cache in its shared-memory pool (read through `shm`) and
the same two registered over plain torch tensors (read through `cma`). The decoder pulls all of
it, one `pull_blocks` call for the whole set of blocks, one `pull_cache` call per batch slot,
and reports GB/s next to `memcpy` (one `copy_` of the same bytes between pre-touched buffers)
measured in the same run. Plus the latency of a 1-block 16 KiB pull and `link_clusters` time.
With Mooncake installed, the same over `mooncake` (TCP on loopback; both sides force
`transfer_backend="mooncake"`, so both listen), labelled "mooncake" (pool caches). And the
pool caches once more through the staging path of device memory, on CPU (labelled "staged").
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import time

import torch

from .. import (BlocksCacheKey, CacheDesc, CacheKeyByIdAndIndex, DataType, LLMClusterInfo,
                LLMConfig, LLMDataDist, LLMRole, Placement)
from ..control.host import free_port
from .common import DataMismatch

BLOCK_SIZES = (16 << 10, 128 << 10, 1 << 20, 2 << 20)
PROMPT_ID, DECODER_ID = 1001, 1002
TENSORS = 2  # one K and one V tensor


def _options(pool_bytes: int, listen: str = "", backend: str = "") -> dict:
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    config.sync_kv_timeout = 60000
    config.mem_pool_cfg = '{"memory_size": %d}' % pool_bytes
    if listen:
        config.listen_ip_info = listen
    if backend:
        config.transfer_backend = backend
    return config.generate_options()


def _content(blocks: int, block: int, seed: int, tensor: int) -> torch.Tensor:
    """Bytes of one prompt-side tensor: every block differs (its index sits in its first
    bytes), so a pull that moves the wrong block or the wrong bytes is seen."""
    row = torch.arange(block, dtype=torch.uint8) * 7 + (seed * 31 + tensor * 17) % 256
    data = row.repeat(blocks, 1)
    index = torch.arange(blocks, dtype=torch.int64)
    data[:, 0], data[:, 1], data[:, 2] = index % 256, index // 256 % 256, seed * 4 + tensor
    return data


def _serve_caches(datadist: LLMDataDist, total_bytes: int):
    """Fill the prompt side; returns (layouts, tensors to keep alive).

    Per block size: blocks and slots in the pool (read through shm / local / mooncake, content
    seeds 0 and 2) and the same registered over plain tensors (read through cma, seeds 1, 3).
    """
    manager = datadist.cache_manager
    layouts, keep = [], []
    for index, block in enumerate(BLOCK_SIZES):
        blocks = total_bytes // TENSORS // block
        desc = lambda: CacheDesc(TENSORS, [blocks, block], DataType.DT_UINT8, Placement.DEVICE)  # noqa: E731
        pooled = manager.allocate_blocks_cache(desc(), BlocksCacheKey(PROMPT_ID, index))
        owned = [_content(blocks, block, 1, t) for t in range(TENSORS)]
        keep.append(owned)
        manager.register_blocks_cache(desc(), [t.data_ptr() for t in owned],
                                      BlocksCacheKey(PROMPT_ID, 100 + index))
        slots = manager.allocate_cache(desc())
        for t, (blocks_tensor, slots_tensor) in enumerate(zip(pooled.tensors, slots.tensors)):
            blocks_tensor.copy_(_content(blocks, block, 0, t))
            slots_tensor.copy_(_content(blocks, block, 2, t))
        owned_slots = [_content(blocks, block, 3, t) for t in range(TENSORS)]
        keep.append(owned_slots)
        registered_slots = manager.register_cache(desc(), [t.data_ptr() for t in owned_slots])
        layouts.append({"block": block, "blocks": blocks, "shm_slots": slots.cache_id,
                        "cma_slots": registered_slots.cache_id})
    return layouts, keep


def _prompt_process(conn, port: int, total_bytes: int, backend: str = "") -> None:
    datadist = LLMDataDist(LLMRole.PROMPT, PROMPT_ID)
    datadist.init(_options(total_bytes * 2 * len(BLOCK_SIZES) + (64 << 20), f"127.0.0.1:{port}",
                           backend))
    layouts, _keep = _serve_caches(datadist, total_bytes)
    conn.send(layouts)
    conn.recv()  # parent says: done
    datadist.finalize()


def _median_gbps(fn, nbytes: int, repeats: int) -> float:
    fn()  # warm-up: maps files, faults pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def _memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    return _median_gbps(lambda: dst.copy_(src), nbytes, repeats)


def _measure(decoder: LLMDataDist, layouts, transports, total_bytes: int, repeats: int) -> list:
    manager = decoder.cache_manager
    memcpy = _memcpy_gbps(total_bytes, repeats)
    rows = []
    for index, layout in enumerate(layouts):
        block, blocks = layout["block"], layout["blocks"]
        desc = CacheDesc(TENSORS, [blocks, block], DataType.DT_UINT8, Placement.DEVICE)
        local_blocks = manager.allocate_blocks_cache(desc)
        local_slots = manager.allocate_cache(CacheDesc(TENSORS, [blocks, block], DataType.DT_UINT8,
                                                       Placement.DEVICE))
        order = torch.randperm(blocks).tolist()
        for transport, model_id, slots_id in transports(index, layout):
            def pull_blocks():
                manager.pull_blocks(BlocksCacheKey(PROMPT_ID, model_id), local_blocks, order,
                                    list(range(blocks)))

            def pull_cache():
                for slot in range(blocks):
                    manager.pull_cache(CacheKeyByIdAndIndex(PROMPT_ID, slots_id, slot), local_slots, slot)
            registered = model_id >= 100
            for op, fn, local, seed in (("pull_blocks", pull_blocks, local_blocks, int(registered)),
                                        ("pull_cache", pull_cache, local_slots, 2 + registered)):
                gbps = _median_gbps(fn, total_bytes, repeats)
                source_blocks = order if op == "pull_blocks" else list(range(blocks))
                for t, tensor in enumerate(local.tensors):
                    expected = _content(blocks, block, seed, t)[source_blocks]
                    if not torch.equal(tensor, expected):
                        raise DataMismatch(f"transfer suite: {transport} {op} of {block} byte "
                                           f"blocks moved wrong bytes into tensor {t}")
                rows.append({"suite": "transfer", "transport": transport, "op": op, "block_bytes": block,
                             "total_bytes": total_bytes, "gbps": round(gbps, 3),
                             "memcpy_gbps": round(memcpy, 3), "ratio": round(gbps / memcpy, 3)})
        manager.deallocate_blocks_cache(local_blocks)
        manager.deallocate_cache(local_slots)
    return rows


def _latency_rows(decoder: LLMDataDist, model_id: int, transport: str, calls: int = 1000) -> dict:
    manager = decoder.cache_manager
    local = manager.allocate_blocks_cache(CacheDesc(TENSORS, [4, 16 << 10], DataType.DT_UINT8,
                                                    Placement.DEVICE))
    samples = []
    for i in range(calls + 50):
        start = time.perf_counter()
        manager.pull_blocks(BlocksCacheKey(PROMPT_ID, model_id), local, [i % 4], [i % 4],
                            src_layer_range=range(0, 1), dst_layer_range=range(0, 1),
                            tensor_num_per_layer=1)
        samples.append(time.perf_counter() - start)
    manager.deallocate_blocks_cache(local)
    samples = sorted(samples[50:])
    return {"suite": "transfer", "transport": transport, "op": "pull_blocks_1x16KiB_latency",
            "block_bytes": 16 << 10, "p50_us": round(samples[len(samples) // 2] * 1e6, 1),
            "p99_us": round(samples[int(len(samples) * 0.99)] * 1e6, 1)}


def _link(decoder: LLMDataDist, port: int) -> float:
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = PROMPT_ID
    cluster.append_local_ip_info("127.0.0.1", 0)
    cluster.append_remote_ip_info("127.0.0.1", port)
    start = time.perf_counter()
    status, _ = decoder.link_clusters([cluster], 5000)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"link_clusters failed: {status}")
    return elapsed


# What each cross-process run measures: (transport label, pool caches, registered caches).
_RUNS = {"": (("shm", True), ("cma", False)), "mooncake": (("mooncake", True),),
         "staged": (("staged", True),)}


def _cross_process(total_bytes: int, repeats: int, run: str = "") -> list:
    """The prompt in a spawned process, the decoder here.

    `run="mooncake"`: both sides force `transfer_backend="mooncake"` (no rows without the
    package). `run="staged"`: the decoder moves every byte through the prompt's host staging
    area and its own bounce buffer, the path device memory of another process takes
    (`LLM_DATADIST_TORCH_STAGE_TRANSFERS=1`, read when the link is made).
    """
    if run == "mooncake":
        try:
            import mooncake.engine  # noqa: F401
        except ImportError:
            return []
    backend = "mooncake" if run == "mooncake" else ""
    port = free_port()
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    prompt = context.Process(target=_prompt_process, args=(child, port, total_bytes, backend),
                             daemon=True)
    prompt.start()
    decoder = LLMDataDist(LLMRole.DECODER, DECODER_ID)
    decoder.init(_options(total_bytes * 2 + (64 << 20),
                          f"127.0.0.1:{free_port()}" if backend else "", backend))
    try:
        if not parent.poll(120):
            raise RuntimeError("the prompt process did not start")
        layouts = parent.recv()
        with _staging_forced(run == "staged"):
            link_s = _link(decoder, port)
        labels = _RUNS[run]

        def transports(i, layout):
            return [(label, i if pooled else 100 + i,
                     layout["shm_slots" if pooled else "cma_slots"]) for label, pooled in labels]
        rows = _measure(decoder, layouts, transports, total_bytes, repeats)
        rows += [_latency_rows(decoder, 0 if pooled else 100, label, calls=300 if backend else 1000)
                 for label, pooled in labels]
        if run != "staged":
            rows.append({"suite": "transfer", "transport": backend or "zmq", "op": "link_clusters",
                         "ms": round(link_s * 1e3, 2)})
        return rows
    finally:
        parent.send("done")
        prompt.join(30)
        if prompt.is_alive():
            prompt.kill()
        decoder.finalize()


@contextlib.contextmanager
def _staging_forced(forced: bool):
    name = "LLM_DATADIST_TORCH_STAGE_TRANSFERS"
    saved = os.environ.get(name)
    if forced:
        os.environ[name] = "1"
    try:
        yield
    finally:
        if forced:
            if saved is None:
                os.environ.pop(name)
            else:
                os.environ[name] = saved


def _in_process(total_bytes: int, repeats: int) -> list:
    port = free_port()
    prompt = LLMDataDist(LLMRole.PROMPT, PROMPT_ID)
    prompt.init(_options(total_bytes * 2 * len(BLOCK_SIZES) + (64 << 20), f"127.0.0.1:{port}"))
    decoder = LLMDataDist(LLMRole.DECODER, DECODER_ID)
    decoder.init(_options(total_bytes * 2 + (64 << 20)))
    try:
        layouts, _keep = _serve_caches(prompt, total_bytes)
        _link(decoder, port)
        rows = _measure(decoder, layouts, lambda i, layout: (("local", i, layout["shm_slots"]),),
                        total_bytes, repeats)
        rows.append(_latency_rows(decoder, 0, "local"))
        return rows
    finally:
        decoder.finalize()
        prompt.finalize()


def run(args) -> list:
    total_bytes = args.total_mib << 20
    return (_cross_process(total_bytes, args.repeats) + _in_process(total_bytes, args.repeats)
            + _cross_process(total_bytes, args.repeats, "mooncake")
            + _cross_process(total_bytes, args.repeats, "staged"))
