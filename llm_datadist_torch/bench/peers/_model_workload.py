"""The model suite's shapes on a peer engine: the two processes (frames from `_workload`).

The server owns max(T) source tensors of `SOURCE_BLOCKS` x max(block) bytes each (the model
suite's byte pattern, seed "peer"), every one registered on its own; the client owns max(T)
destination tensors of max(k) x max(block) bytes. Per block size the client hands the peer both
sides' address lists once (`Client.batch_reader`: every block of every tensor, one entry per
block) and per shape prepares one read per source block set: entries of the first T tensors,
k blocks each, the same sets as our pulls (`model_shapes.block_sets`). Calls are timed like ours
(`model_shapes.time_calls`), and the destination is checked after the timed calls: a wrong byte
is "wrong data", never a number.
"""
from __future__ import annotations

from typing import List

import torch

from .. import model_shapes as ms
from . import _workload

SEED = ms.SEEDS["peer"]


def _sizes(shapes: List[ms.Shape]):
    return (max(s.tensors for s in shapes), max(s.block for s in shapes),
            max(s.k for s in shapes))


def server_main(module: str, conn, shapes: List[ms.Shape], log: str) -> None:
    tensors, block, _ = _sizes(shapes)

    def make() -> list:
        return [ms.pattern(t, 0, ms.SOURCE_BLOCKS * block, SEED) for t in range(tensors)]
    _workload.serve(module, conn, log, make,
                    lambda server, owned: (server.endpoint(), [t.data_ptr() for t in owned]))


def client_main(module: str, conn, result, shapes: List[ms.Shape], calls: int,
                log: str) -> None:
    def work(peer, endpoint, opened: list) -> List[dict]:
        endpoint, bases = endpoint
        tensors, block_max, k_max = _sizes(shapes)
        dst = [torch.zeros(k_max * block_max, dtype=torch.uint8) for _ in range(tensors)]
        client = peer.Client(dst, endpoint, conn)
        opened.append(client)
        rows, prepared = [], {}
        for shape in shapes:
            block = shape.block
            if block not in prepared:
                prepared[block] = client.batch_reader(
                    [bases[t] + b * block for t in range(tensors) for b in range(ms.SOURCE_BLOCKS)],
                    [d.data_ptr() + i * block for d in dst for i in range(k_max)], block)
            rows.append(_measure(prepared[block], dst, shape, k_max, calls))
        return rows
    _workload.attend(module, conn, result, log, work)


def _measure(prepare, dst: List[torch.Tensor], shape: ms.Shape, k_max: int, calls: int) -> dict:
    sets = ms.block_sets(shape.block, shape.k)
    local = [t * k_max + i for t in range(shape.tensors) for i in range(shape.k)]
    reads = [prepare([t * ms.SOURCE_BLOCKS + b for t in range(shape.tensors) for b in blocks],
                     local) for blocks in sets]
    for tensor in dst[:shape.tensors]:
        tensor.zero_()
    timed = ms.calls_for(shape, calls)
    samples = ms.time_calls(reads, timed)
    last = sets[(timed - 1) % len(sets)]
    views = [d.view(-1, shape.block) for d in dst]
    wrong = ms.wrong_tensors(views, shape, last, SEED)
    if wrong:
        raise _workload.WrongData(f"{shape.k} x {shape.block} byte blocks of {shape.tensors} "
                                  f"tensors: {len(wrong)} tensors hold wrong bytes "
                                  f"(first: {wrong[0]})")
    return ms.row("", "read", shape, timed, ms.stats(samples, shape.call_bytes), True)
