"""The `calls` suite: what a call costs beyond its bytes, on a 32-layer cache (64 tensors, K and
V per layer) shared with a prompt process, next to one control round trip measured in the same
run.

* `ping`: one request/reply on the link (`Ping`), the unit the other rows are read in;
* `pull_cache` of one slot (16 KiB per tensor) by `CacheKeyByIdAndIndex` (the owner's answer
  is kept: no round trip) and by `CacheKey` (one round trip: the request key is resolved on the
  owner; the release notice that follows does not hold up the caller). The key rows' bytes are
  checked after the timed calls and every pulled key must be released on the owner;
* `transfer_cache_async` of the 32 layers, K and V of one 16 KiB slot each, to raw addresses
  of the prompt's cache (`TransferConfig`), timed from the call to `synchronize()`; `per_layer_us`
  is (p50 - memcpy p50 of the same bytes) / layers: the cost of a layer beyond its copy.
"""
from __future__ import annotations

import multiprocessing
import time
from typing import List

import torch

from .. import (CacheDesc, CacheKey, CacheKeyByIdAndIndex, DataType, LLMDataDist, LLMRole,
                LayerSynchronizer, Placement, TransferConfig)
from ..control.host import free_port
from ..control.messages import Ping
from . import model_shapes as ms
from .common import DataMismatch, stop_prompt
from .transfer import DECODER_ID, PROMPT_ID, _link, _options

LAYERS = 32
TENSORS = 2 * LAYERS
SLOT = 16 << 10
KEYED_SLOTS = 200  # one request key per slot: each keyed pull consumes one; one more slot
# without a key serves the pulls by id
TASKS = 100


class _Ready(LayerSynchronizer):
    """Every layer is computed already: the task measures the transfer alone."""

    def synchronize_layer(self, layer_index: int, timeout_in_millis) -> bool:
        return True


def _desc(slots: int) -> CacheDesc:
    return CacheDesc(TENSORS, [slots, SLOT], DataType.DT_UINT8, Placement.DEVICE)


def _slot_bytes(tensor: int, slot: int) -> torch.Tensor:
    return ((torch.arange(SLOT) + 7 * tensor + 13 * slot) % 251).to(torch.uint8)


def _prompt_process(conn, port: int) -> None:
    """Holds the keyed cache (slot i < KEYED_SLOTS bound to request i, the last slot bound to
    none) and the sink cache of the pushes;
    answers the sink's tensor addresses, then the request keys still bound, until "done"."""
    datadist = LLMDataDist(LLMRole.PROMPT, PROMPT_ID)
    datadist.init(_options(TENSORS * (KEYED_SLOTS + 2) * SLOT + (64 << 20),
                           f"127.0.0.1:{port}"))
    manager = datadist.cache_manager
    try:
        keyed = manager.allocate_cache(_desc(KEYED_SLOTS + 1), [CacheKey(PROMPT_ID, req_id=i)
                                                                for i in range(KEYED_SLOTS)])
        for t, tensor in enumerate(keyed.tensors):
            for slot in range(KEYED_SLOTS + 1):
                tensor[slot].copy_(_slot_bytes(t, slot))
        sink = manager.allocate_cache(_desc(1))
        conn.send((keyed.cache_id, list(sink.tensor_addrs)))
        while conn.recv() != "done":
            bound = [k for k in datadist._engine.table.bound_keys() if k[0] == "req"]
            conn.send(len(bound))
    except EOFError:
        pass
    finally:
        datadist.finalize()


def _row(op: str, samples: List[float], nbytes: int, **extra) -> dict:
    return {"suite": "calls", "op": op, "tensors": TENSORS, "call_bytes": nbytes,
            "calls": len(samples), **ms.stats(samples, max(nbytes, 1)), **extra}


def _time(call, times: int) -> List[float]:
    samples = []
    for i in range(times):
        start = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - start)
    return samples


def run(_args) -> List[dict]:
    port = free_port()
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    prompt = context.Process(target=_prompt_process, args=(child, port), daemon=True)
    prompt.start()
    decoder = LLMDataDist(LLMRole.DECODER, DECODER_ID)
    decoder.init(_options(TENSORS * SLOT * 2 + (64 << 20)))
    try:
        if not parent.poll(120):
            raise RuntimeError("the prompt process did not start")
        keyed_id, sink_addrs = parent.recv()
        _link(decoder, port)
        return _measure(decoder, parent, keyed_id, sink_addrs)
    finally:
        stop_prompt(parent, prompt, decoder)


def _measure(decoder, conn, keyed_id: int, sink_addrs: List[int]) -> List[dict]:
    manager = decoder.cache_manager
    link = decoder._links.get(PROMPT_ID)
    slot_bytes = TENSORS * SLOT
    rows = [_row("ping", _time(lambda i: link.rpc.call(Ping(), 5.0), 1000), 0)]

    local = manager.allocate_cache(_desc(1))
    by_id = _time(lambda i: manager.pull_cache(
        CacheKeyByIdAndIndex(PROMPT_ID, keyed_id, KEYED_SLOTS), local, 0), 1000)
    if not all(torch.equal(local.tensors[t][0], _slot_bytes(t, KEYED_SLOTS))
               for t in range(TENSORS)):
        raise DataMismatch("calls suite: pull_cache by id moved wrong bytes")
    rows.append(_row("pull_cache by id (answer kept)", by_id, slot_bytes))
    by_key = _time(lambda i: manager.pull_cache(CacheKey(PROMPT_ID, req_id=i), local, 0),
                   KEYED_SLOTS)
    last = KEYED_SLOTS - 1
    if not all(torch.equal(local.tensors[t][0], _slot_bytes(t, last)) for t in range(TENSORS)):
        raise DataMismatch("calls suite: pull_cache by CacheKey moved wrong bytes")
    rows.append(_row("pull_cache by CacheKey", by_key, slot_bytes))
    deadline = time.monotonic() + 10
    while True:
        conn.send("keys")
        if conn.recv() == 0:
            break
        if time.monotonic() > deadline:
            raise DataMismatch("calls suite: pulled request keys were never released")
        time.sleep(0.01)

    copy = torch.empty(slot_bytes, dtype=torch.uint8)
    source = torch.ones(slot_bytes, dtype=torch.uint8)
    memcpy = _time(lambda i: copy.copy_(source), 1000)
    rows.append(_row("memcpy of the pushed bytes", memcpy, slot_bytes))
    src = manager.allocate_cache(_desc(1))
    config = [TransferConfig(PROMPT_ID, sink_addrs)]

    def push(_i):
        status = manager.transfer_cache_async(src, _Ready(), config).synchronize()
        if status != 0:
            raise RuntimeError(f"transfer_cache_async: {status}")
    pushes = _time(push, TASKS)
    beyond = ms.stats(pushes, 1)["p50_us"] - ms.stats(memcpy, 1)["p50_us"]
    rows.append(_row(f"transfer_cache_async of {LAYERS} layers", pushes, slot_bytes,
                     per_layer_us=round(beyond / LAYERS, 1)))
    return rows
