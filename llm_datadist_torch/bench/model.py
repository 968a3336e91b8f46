"""The `model` suite: one `pull_blocks` of k blocks of every tensor of a model-shaped cache.

A prompt cluster in a spawned process serves, one at a time, a blocks cache of T tensors (K and
V per layer, see `model_shapes`) in its shared-memory pool (`allocate_blocks_cache`, read
through `shm`) or registered over T plain torch tensors (`register_blocks_cache`, read through
`cma`). The decoder here pulls k blocks of every tensor per call (`pull_blocks`, all tensors,
k=1 and k=16) into a pool blocks cache and reports the latency per call (p50, p99 over
`model_shapes.calls_for` timed calls), GB/s at the p50 and whether the bytes of the last timed call are right (checked after the timed calls; a
wrong byte raises `DataMismatch`). Next to it, per shape, one `copy_` of the same bytes
(transport "memcpy"), cycling through source buffers as large as the cache like the pulls do;
and per transport and block size the least-squares fit of the k=1 p50 over T (fixed µs per
call, µs per tensor). `--report` adds the peer engines on the same shapes (`peers.run_model`).
"""
from __future__ import annotations

import multiprocessing
from typing import Dict, List

import torch

from .. import (BlocksCacheKey, CacheDesc, DataType, LLMDataDist, LLMRole, Placement)
from ..control.host import free_port
from . import model_shapes as ms
from .common import DataMismatch, stop_prompt
from .transfer import DECODER_ID, PROMPT_ID, _link, _options

TRANSPORTS = ("shm", "cma")  # pool memory, registered memory
MARGIN = 64 << 20  # pool bytes besides the largest cache


def _desc(tensors: int, blocks: int, block: int) -> CacheDesc:
    return CacheDesc(tensors, [blocks, block], DataType.DT_UINT8, Placement.DEVICE)


def _serve(manager, kind: str, tensors: int, block: int, model_id: int):
    """One source cache; returns (how to drop it, tensors to keep alive)."""
    nbytes = ms.SOURCE_BLOCKS * block
    desc = _desc(tensors, ms.SOURCE_BLOCKS, block)
    key = BlocksCacheKey(PROMPT_ID, model_id)
    if kind == "shm":
        cache = manager.allocate_blocks_cache(desc, key)
        for t, tensor in enumerate(cache.tensors):
            tensor.view(-1).copy_(ms.pattern(t, 0, nbytes, ms.SEEDS[kind]))
        return (lambda: manager.deallocate_blocks_cache(cache)), []
    owned = [ms.pattern(t, 0, nbytes, ms.SEEDS[kind]) for t in range(tensors)]
    cache = manager.register_blocks_cache(desc, [t.data_ptr() for t in owned], key)
    return (lambda: manager.unregister_cache(cache.cache_id)), owned


def _prompt_process(conn, port: int, pool_bytes: int) -> None:
    """Serve one source cache at a time: ("serve", kind, tensors, block, model_id) and
    ("drop", model_id), each answered "ok" (or the error), until "done"."""
    datadist = LLMDataDist(LLMRole.PROMPT, PROMPT_ID)
    datadist.init(_options(pool_bytes, f"127.0.0.1:{port}"))
    served: Dict[int, tuple] = {}
    try:
        conn.send("ready")
        while True:
            message = conn.recv()
            if message == "done":
                break
            try:
                if message[0] == "serve":
                    kind, tensors, block, model_id = message[1:]
                    served[model_id] = _serve(datadist.cache_manager, kind, tensors, block,
                                              model_id)
                else:
                    drop, _keep = served.pop(message[1])
                    drop()
                conn.send("ok")
            except Exception as exc:  # noqa: BLE001 -- the decoder raises it
                conn.send(f"prompt: {type(exc).__name__}: {exc}")
    except EOFError:
        pass
    finally:
        datadist.finalize()


def _ask(conn, *message) -> None:
    conn.send(message)
    if not conn.poll(120):
        raise RuntimeError(f"the prompt process did not answer {message[0]!r}")
    answer = conn.recv()
    if answer != "ok":
        raise RuntimeError(answer)


def _pull_rows(manager, dst, model_id: int, transport: str, shapes: List[ms.Shape],
               calls: int) -> List[dict]:
    """Rows of every k for one source cache (same tensors and block size)."""
    key = BlocksCacheKey(PROMPT_ID, model_id)
    rows = []
    for shape in shapes:
        sets = ms.block_sets(shape.block, shape.k)
        targets = list(range(shape.k))
        for tensor in dst.tensors:
            tensor.zero_()  # so the check sees bytes the calls moved

        def pull(blocks):
            return lambda: manager.pull_blocks(key, dst, blocks, targets)
        timed = ms.calls_for(shape, calls)
        samples = ms.time_calls([pull(blocks) for blocks in sets], timed)
        last = sets[(timed - 1) % len(sets)]
        wrong = ms.wrong_tensors(dst.tensors, shape, last, ms.SEEDS[transport])
        if wrong:
            raise DataMismatch(f"model suite: {transport} pull_blocks of {shape.k} x "
                               f"{shape.block} byte blocks of {shape.tensors} tensors moved wrong "
                               f"bytes into {len(wrong)} tensors (first: {wrong[0]})")
        rows.append(ms.row(transport, "pull_blocks", shape, timed,
                           ms.stats(samples, shape.call_bytes), True))
    return rows


def memcpy_row(shape: ms.Shape, calls: int) -> dict:
    """One `copy_` of a call's bytes on one thread (a memcpy: torch's threads would add their
    wake-up to small copies), the source cycling through buffers as large as the cache."""
    sets = ms.SOURCE_BLOCKS // shape.k
    src = torch.ones(sets, shape.call_bytes, dtype=torch.uint8)
    src[:, 0] = torch.arange(sets, dtype=torch.uint8)
    dst = torch.zeros(shape.call_bytes, dtype=torch.uint8)
    timed = ms.calls_for(shape, calls)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples = ms.time_calls([lambda i=i: dst.copy_(src[i]) for i in range(sets)], timed)
    finally:
        torch.set_num_threads(threads)
    checked = torch.equal(dst, src[(timed - 1) % sets])
    if not checked:
        raise DataMismatch(f"model suite: copy_ of {shape.call_bytes} bytes moved wrong bytes")
    return ms.row("memcpy", "copy_", shape, timed, ms.stats(samples, shape.call_bytes), True)


def measure(shapes: List[ms.Shape], calls: int = 0) -> List[dict]:
    """Measurement rows of `shapes` (ours on both transports, memcpy), fits not included."""
    largest = max(s.tensors * s.block for s in shapes)
    k_max = max(s.k for s in shapes)
    port = free_port()
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    prompt = context.Process(target=_prompt_process, daemon=True,
                             args=(child, port, largest * ms.SOURCE_BLOCKS + MARGIN))
    prompt.start()
    decoder = LLMDataDist(LLMRole.DECODER, DECODER_ID)
    decoder.init(_options(largest * k_max + MARGIN))
    manager = decoder.cache_manager
    rows: List[dict] = []
    try:
        if not parent.poll(120) or parent.recv() != "ready":
            raise RuntimeError("the prompt process did not start")
        _link(decoder, port)
        groups: Dict[tuple, List[ms.Shape]] = {}
        for shape in shapes:
            groups.setdefault((shape.block, shape.tensors), []).append(shape)
        model_id = 0
        for (block, tensors), group in groups.items():
            dst = manager.allocate_blocks_cache(_desc(tensors, k_max, block))
            try:
                for transport in TRANSPORTS:
                    model_id += 1
                    _ask(parent, "serve", transport, tensors, block, model_id)
                    try:
                        rows += _pull_rows(manager, dst, model_id, transport, group, calls)
                    finally:
                        _ask(parent, "drop", model_id)
            finally:
                manager.deallocate_blocks_cache(dst)
            rows += [memcpy_row(shape, calls) for shape in group]
        return rows
    finally:
        stop_prompt(parent, prompt, decoder)


def shapes_of(args) -> List[ms.Shape]:
    return ms.plan(getattr(args, "tensors", None) or ms.TENSORS)


def run(args) -> List[dict]:
    rows = ms.stamp_memcpy(measure(shapes_of(args), getattr(args, "model_calls", 0)))
    return rows + ms.fit_rows(rows)
