"""Other transfer engines on the transfer suite's `pull_blocks` workload, as reference rows, and
on the model suite's shapes (`run_model`, see `_model_workload`).

`run(names, total_bytes, repeats, ceiling)` runs each named peer (see `PEERS`) in two spawned
processes (server and client, see `_workload`) and returns `(rows, statuses)`. Rows look like
the transfer suite's, with `suite="peer"` and the peer's label as `transport`, stamped with the
memcpy ceiling of the same run; a status per peer says "ok", "not installed", "not usable",
"wrong data", "timed out" or "error", with a detail. Engines are imported only inside those
processes: a missing, hanging or crashing engine costs a status line, never the report.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import multiprocessing
import statistics
import tempfile
import time
from typing import Dict, List, Tuple

import torch

from . import _workload

# Peer name (for --peers) -> module with LABEL, DISTRIBUTION, IMPORT, INSTALL, setup() (how it
# is driven, for the report), Server and Client.
PEERS = {
    "nixl": "llm_datadist_torch.bench.peers.nixl",
    "mooncake-te": "llm_datadist_torch.bench.peers.mooncake_te",
}
TIMEOUT_S = 300.0  # one peer: start-up and every block size
LOG_TAIL = 1500  # characters of the engines' log quoted when a peer fails


def memcpy_gbps(total_bytes: int, repeats: int) -> float:
    """The ceiling as the transfer suite measures it (one `copy_` of the same bytes between
    pre-touched buffers, median), for runs without that suite."""
    src = torch.ones(total_bytes, dtype=torch.uint8)
    dst = torch.zeros(total_bytes, dtype=torch.uint8)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return total_bytes / statistics.median(times) / 1e9


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _wait(result, client, timeout_s: float) -> Tuple[str, object]:
    deadline = time.monotonic() + timeout_s
    while not result.poll(0.2):
        if time.monotonic() > deadline:
            return "timed out", f"no result after {timeout_s:.0f} s"
        if not client.is_alive() and not result.poll(0):
            return "error", f"client process died (exit code {client.exitcode})"
    return result.recv()


def _run_one(module: str, total_bytes: int, repeats: int, timeout_s: float
             ) -> Tuple[str, object]:
    """(status, rows or detail) of one peer on the transfer workload."""
    return _spawn(module, _workload.server_main, (total_bytes,), _workload.client_main,
                  (total_bytes, repeats), timeout_s)


def _spawn(module: str, server_main, server_args: tuple, client_main, client_args: tuple,
           timeout_s: float) -> Tuple[str, object]:
    """Run the peer `module` in `server_main(module, conn, *server_args, log)` and
    `client_main(module, conn, result, *client_args, log)` processes (see `_workload`):
    (status, rows or detail); both processes are gone when it returns."""
    context = multiprocessing.get_context("spawn")
    server_end, client_end = context.Pipe()
    result_recv, result_send = context.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile("rb", prefix="bench-peer-", suffix=".log") as log:
        server = context.Process(target=server_main, daemon=True,
                                 args=(module, server_end, *server_args, log.name))
        client = context.Process(target=client_main, daemon=True,
                                 args=(module, client_end, result_send, *client_args, log.name))
        server.start()
        client.start()
        try:
            status, detail = _wait(result_recv, client, timeout_s)
        finally:
            for process in (client, server):
                process.join(10)
                if process.is_alive():
                    process.kill()
                    process.join()
        if status != "ok":
            text = log.read().decode(errors="replace").strip()
            if text:
                detail = f"{detail}; log: {'...' if len(text) > LOG_TAIL else ''}{text[-LOG_TAIL:]}"
        return status, detail


def _status(name: str, workload: str, peer, setup: str) -> dict:
    return {"peer": name, "workload": workload, "transport": peer.LABEL,
            "version": _version(peer.DISTRIBUTION), "setup": setup}


def run(names: List[str], total_bytes: int, repeats: int, ceiling: Dict[int, float],
        timeout_s: float = TIMEOUT_S) -> Tuple[List[dict], List[dict]]:
    """`ceiling`: the run's memcpy GB/s per block size; a size it lacks is measured here."""
    ceiling = dict(ceiling)
    rows, statuses = [], []
    for name in names:
        peer = importlib.import_module(PEERS[name])  # light: the engine is not imported here
        status = _status(name, "transfer", peer, peer.setup())
        if importlib.util.find_spec(peer.IMPORT) is None:
            statuses.append({**status, "status": "not installed", "detail": peer.INSTALL})
            continue
        result, detail = _run_one(PEERS[name], total_bytes, repeats, timeout_s)
        if result != "ok":
            statuses.append({**status, "status": result, "detail": str(detail)})
            continue
        for row in detail:
            block = row["block_bytes"]
            if block not in ceiling:
                ceiling[block] = memcpy_gbps(row["total_bytes"], repeats)
            rows.append({"suite": "peer", "transport": peer.LABEL, "op": "pull_blocks",
                         "block_bytes": block, "total_bytes": row["total_bytes"],
                         "gbps": round(row["gbps"], 3), "memcpy_gbps": round(ceiling[block], 3),
                         "ratio": round(row["gbps"] / ceiling[block], 3)})
        statuses.append({**status, "status": "ok",
                         "detail": f"first read, connect included: {detail[0]['first_ms']:.1f} ms"})
    return rows, statuses


def run_model(names: List[str], shapes: list, calls: int = 0, timeout_s: float = TIMEOUT_S
              ) -> Tuple[List[dict], List[dict]]:
    """The model suite's shapes (`model_shapes.Shape`) on each named peer: `(rows, statuses)`,
    rows like the model suite's with the peer's label as `transport` and op "read"; `calls`
    overrides the timed calls per shape as in the suite."""
    from . import _model_workload

    rows, statuses = [], []
    for name in names:
        peer = importlib.import_module(PEERS[name])
        status = _status(name, "model", peer, peer.model_setup())
        if importlib.util.find_spec(peer.IMPORT) is None:
            statuses.append({**status, "status": "not installed", "detail": peer.INSTALL})
            continue
        result, detail = _spawn(PEERS[name], _model_workload.server_main, (shapes,),
                                _model_workload.client_main, (shapes, calls), timeout_s)
        if result != "ok":
            statuses.append({**status, "status": result, "detail": str(detail)})
            continue
        rows += [{**row, "transport": peer.LABEL} for row in detail]
        statuses.append({**status, "status": "ok",
                         "detail": f"{len(detail)} shapes, every one's bytes checked after its "
                                   "timed calls"})
    return rows, statuses
