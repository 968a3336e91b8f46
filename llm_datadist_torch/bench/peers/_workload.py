"""The workload every peer engine runs, and the two processes that run it.

The transfer suite's `pull_blocks` workload, without our library: a server process owns
`total_bytes` of seeded random bytes laid out as K and V tensors of `blocks` blocks; a client
process reads every block of both into its own buffer with one batched READ, source block
`order[i]` into destination block `i` (`order` a random permutation), per block size. The
client regenerates the server's bytes from the seed and checks the first read: a peer that moves
wrong bytes is reported as an error, never as a number.

A peer module provides `Server(tensor)` (registers it, or each tensor of a list; `.endpoint()`
is what the client needs, picklable; `.close()`) and `Client(tensor, endpoint, conn)` (the same
for its own memory; `.reader(src, dst, length)` returns a callable doing one batched read of
`length`-byte blocks from the server's byte offsets `src` to the client's offsets `dst`;
`.batch_reader(remote_addrs, local_addrs, length)`, used by the model suite's workload in
`_model_workload`, returns `prepare(remote_indices, local_indices)`, which returns a callable
reading those entries of the two address lists; `.close()`). `serve` and `attend` are the two
processes' frames, shared by both workloads.
"""
from __future__ import annotations

import importlib
import os
import statistics
import time
import traceback
from typing import Callable, List

import torch

from ..transfer import BLOCK_SIZES, TENSORS

SEED = 20240604


def source_bytes(total_bytes: int) -> torch.Tensor:
    """The server's bytes; the client makes the same ones to check what it read."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, 256, (total_bytes,), dtype=torch.uint8, generator=generator)


def _order(blocks: int, block: int) -> torch.Tensor:
    return torch.randperm(blocks, generator=torch.Generator().manual_seed(block))


def _offsets(order: torch.Tensor, blocks: int, block: int):
    """(src, dst) byte offsets of every block of every tensor: tensor t, block b sits at
    (t * blocks + b) * block on both sides."""
    src, dst = [], []
    for t in range(TENSORS):
        base = t * blocks
        src += ((base + order) * block).tolist()
        dst += [(base + i) * block for i in range(blocks)]
    return src, dst


def _check(expected: torch.Tensor, dst: torch.Tensor, order: torch.Tensor, blocks: int,
           block: int) -> str:
    """'' when every destination block holds its source block, else what is wrong."""
    moved = TENSORS * blocks * block
    want = expected[:moved].view(TENSORS, blocks, block)[:, order]
    got = dst[:moved].view(TENSORS, blocks, block)
    if torch.equal(want, got):
        return ""
    bad = int((want != got).any(dim=2).sum())
    return f"{block} byte blocks: {bad} of {TENSORS * blocks} blocks differ from their source"


def _measure(client, expected: torch.Tensor, dst: torch.Tensor, block: int,
             repeats: int) -> dict:
    blocks = expected.numel() // TENSORS // block
    order = _order(blocks, block)
    src, dst_offsets = _offsets(order, blocks, block)
    read: Callable[[], None] = client.reader(src, dst_offsets, block)
    dst.fill_(0)  # scrambled, so the check sees bytes this read moved
    start = time.perf_counter()
    read()  # warm-up; the first block size's includes connecting to the server
    first_s = time.perf_counter() - start
    problem = _check(expected, dst, order, blocks, block)
    if problem:
        raise WrongData(problem)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        times.append(time.perf_counter() - start)
    nbytes = TENSORS * blocks * block
    return {"block_bytes": block, "total_bytes": nbytes,
            "gbps": nbytes / statistics.median(times) / 1e9, "first_ms": first_s * 1e3}


class WrongData(Exception):
    pass


def _log_to(path: str) -> None:
    """Send this process's stdout and stderr (the engines' own logging, from C++ too) to a file:
    the report shows its tail when the peer fails, and stays readable when it does not."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def server_main(module: str, conn, total_bytes: int, log: str) -> None:
    """Serve `total_bytes` until the client says done (or its end of the pipe closes)."""
    serve(module, conn, log, lambda: source_bytes(total_bytes))


def serve(module: str, conn, log: str, make: Callable[[], object],
          describe: Callable[[object, object], object] = lambda server, tensors: server.endpoint()
          ) -> None:
    """Register what `make()` returns (a tensor or a list of them) with the peer's `Server` and
    hand the client `describe(server, tensors)`; serve until the client says done."""
    _log_to(log)
    server = None
    try:
        peer = importlib.import_module(module)
        tensor = make()
        server = peer.Server(tensor)
        conn.send(("ready", describe(server, tensor)))
        while True:
            message = conn.recv()
            if message == "done":
                break
            server.on_message(message)  # e.g. the client's metadata
    except EOFError:
        pass
    except BaseException as exc:  # noqa: BLE001 -- reported to the client, which reports it
        try:
            conn.send(("error", f"server: {type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        if server is not None:
            server.close()


def client_main(module: str, conn, result, total_bytes: int, repeats: int, log: str) -> None:
    """Read every block size; send ("ok", rows), ("wrong data", why) or ("error", why)."""
    def work(peer, endpoint, opened: list) -> List[dict]:
        expected = source_bytes(total_bytes)
        dst = torch.zeros(total_bytes, dtype=torch.uint8)  # zeroed: pre-faulted
        client = peer.Client(dst, endpoint, conn)
        opened.append(client)
        return [_measure(client, expected, dst, block, repeats)
                for block in BLOCK_SIZES if total_bytes // TENSORS // block]
    attend(module, conn, result, log, work)


def attend(module: str, conn, result, log: str,
           work: Callable[[object, object, list], List[dict]]) -> None:
    """The client process: wait for the server's endpoint, run `work(peer module, endpoint,
    opened)` (clients it makes go into `opened`, closed here) and send ("ok", rows),
    ("wrong data", why), ("not usable", why) or ("error", why) on `result`."""
    _log_to(log)
    opened: list = []
    try:
        peer = importlib.import_module(module)
        kind, endpoint = conn.recv()
        if kind != "ready":
            result.send(("error", endpoint))
            return
        result.send(("ok", work(peer, endpoint, opened)))
    except WrongData as exc:
        result.send(("wrong data", str(exc)))
    except ImportError as exc:  # installed, but a native library is missing
        result.send(("not usable", f"import failed: {exc}"))
    except BaseException as exc:  # noqa: BLE001
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        result.send(("error", f"client: {detail}"))
    finally:
        for client in opened:
            client.close()
        try:
            conn.send("done")
        except OSError:
            pass
