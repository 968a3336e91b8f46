"""The report's model section: the model suite's rows side by side per shape, and the fits.

One line per shape (tensors, block size, k): p50 / p99 µs and GB/s of every transport that
measured it (memcpy, ours through shm and cma, the peer engines), then the ratios: NIXL's p50
over ours (above 1: ours is faster) and our GB/s over memcpy's. A second table has the
least-squares fits of the k=1 p50 over the tensor count (fixed µs per call, µs per tensor).
"""
from __future__ import annotations

from typing import Dict, List, TextIO, Tuple

from .report import format_value, human_bytes

ORDER = ("memcpy", "shm", "cma", "nixl-ucx", "mooncake-te-tcp")
OURS = ("shm", "cma")
NIXL = "nixl-ucx"


def _measured(rows: List[dict]) -> List[dict]:
    return [r for r in rows if r.get("suite") == "model" and "p50_us" in r]


def _fits(rows: List[dict]) -> List[dict]:
    return [r for r in rows if r.get("suite") == "model" and "fixed_us" in r]


def _transports(rows: List[dict]) -> List[str]:
    present = list(dict.fromkeys(r["transport"] for r in rows))
    return [t for t in ORDER if t in present] + [t for t in present if t not in ORDER]


def _us(value) -> str:
    return format_value("us", float(value))


def comparison(rows: List[dict]) -> Tuple[List[str], List[List[str]]]:
    """(header, lines) of the side-by-side table of the model rows in `rows`."""
    measured = _measured(rows)
    transports = _transports(measured)
    by_shape: Dict[Tuple[int, int, int], Dict[str, dict]] = {}
    for r in measured:
        by_shape.setdefault((r["block_bytes"], r["tensors"], r["blocks"]), {})[r["transport"]] = r
    ratios = ([(f"{NIXL} p50 / {t} p50", NIXL, t) for t in OURS if t in transports]
              if NIXL in transports else [])
    ratios += ([(f"{t} GB/s / memcpy", t, "memcpy") for t in OURS if t in transports]
               if "memcpy" in transports else [])
    header = ["tensors", "block", "k", "bytes per call"]
    for t in transports:
        header += [f"{t} p50 / p99 µs", f"{t} GB/s"]
    header += [name for name, _, _ in ratios]
    lines = []
    for (block, tensors, k), cells in sorted(by_shape.items()):
        any_row = next(iter(cells.values()))
        line = [str(tensors), human_bytes(block), str(k), human_bytes(any_row["call_bytes"])]
        for t in transports:
            r = cells.get(t)
            line += ([f"{_us(r['p50_us'])} / {_us(r['p99_us'])}", format_value("gbps", r["gbps"])]
                     if r else ["", ""])
        for name, top, bottom in ratios:
            a, b = cells.get(top), cells.get(bottom)
            if not a or not b:
                line.append("")
            elif top == NIXL:  # latency: NIXL's time over ours
                line.append(f"{a['p50_us'] / b['p50_us']:.2f}" if b["p50_us"] else "")
            else:  # throughput: ours over memcpy
                line.append(f"{a['gbps'] / b['gbps']:.2f}" if b["gbps"] else "")
        lines.append(line)
    return header, lines


def fit_table(rows: List[dict]) -> Tuple[List[str], List[List[str]]]:
    fits = _fits(rows)
    order = {t: i for i, t in enumerate(_transports(fits))}
    copy = {r["block_bytes"]: r["per_tensor_us"] for r in fits if r["transport"] == "memcpy"}
    header = ["transport", "block", "fit of", "fixed µs per call", "µs per tensor",
              "µs per tensor beyond memcpy's", "max residual µs", "tensors"]
    lines = [[r["transport"], human_bytes(r["block_bytes"]), r["op"].replace("fit_", ""),
              _us(r["fixed_us"]), format_value("x", float(r["per_tensor_us"])),
              format_value("x", float(r["per_tensor_us"] - copy[r["block_bytes"]]))
              if r["block_bytes"] in copy and r["transport"] != "memcpy" else "",
              _us(r["max_residual_us"]), r["tensors"]]
             for r in sorted(fits, key=lambda r: (r["block_bytes"], order[r["transport"]]))]
    return header, lines


def _print(header: List[str], lines: List[List[str]], out: TextIO) -> None:
    print("| " + " | ".join(header) + " |", file=out)
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|", file=out)
    for line in lines:
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |", file=out)
    print(file=out)


def write(rows: List[dict], out: TextIO) -> None:
    """The model section of the markdown report; nothing when `rows` has no model rows."""
    if not _measured(rows):
        return
    print("## Model-shaped pulls\n", file=out)
    print("One call pulls k blocks of every tensor of a blocks cache of `tensors` tensors (K and "
          "V per layer: 64 for 32 layers, 160 for 80 layers, 2 as the reference) from a prompt "
          "process: `pull_blocks` from pool memory (`shm`) or from registered torch tensors "
          "(`cma`); the peer engines read the same k x tensors blocks in one request; `memcpy` is "
          "one `copy_` of the same bytes on one thread. Successive calls read other source "
          "blocks (32 blocks per tensor, disjoint sets of k), as a decoder does. p50 / p99 over "
          "the timed calls (`calls` in the rows below: 200 for k=1, 50 for k=16, fewer where "
          "they would move over 2 GiB, at least 10; after one call per block set), GB/s at "
          "the p50; the destination's "
          "bytes are checked after the timed calls. Ratios: NIXL's p50 over ours (above 1: ours "
          "is faster); our GB/s over memcpy's.\n", file=out)
    _print(*comparison(rows), out)
    header, lines = fit_table(rows)
    if lines:
        print("Least-squares fit of the k=1 p50 over the tensor count: p50 = fixed + "
              "per tensor x tensors; beyond memcpy's: the per-tensor cost less that of copying "
              "the tensor's bytes (memcpy's own slope).\n", file=out)
        _print(header, lines, out)
