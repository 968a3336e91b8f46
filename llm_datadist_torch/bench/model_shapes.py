"""What the `model` suite moves, shared by our measurement and the peer engines' processes.

A model's blocks cache is `tensors` tensors (K and V per layer: 64 for 32 layers, 160 for 80;
2 is the small reference), each `SOURCE_BLOCKS` blocks of `block` bytes. One call pulls `k`
blocks of every tensor (k x tensors regions of `block` bytes) into blocks 0..k-1 of the
destination. Call i reads source block set `i % len(sets)`: `SOURCE_BLOCKS // k` disjoint sets
of k blocks in random order, so that successive calls read other memory, as a decoder does,
rather than what the previous call left in the CPU caches. Plus the timing helpers, the byte
pattern every source holds (checked after the timed calls) and the fit of latency over tensors.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Sequence, Tuple

import torch

TENSORS = (2, 64, 160)  # 2 x layers: the reference, 32 layers, 80 layers
BLOCK_SIZES = (16 << 10, 128 << 10)  # bytes per block and tensor
BLOCKS_PER_CALL = (1, 16)  # k
SOURCE_BLOCKS = 32  # blocks per source tensor: 2 x max(k)
CALLS = {1: 200, 16: 50}  # timed calls per measurement, per k (others: 50) ...
MAX_TIMED_BYTES = 2 << 30  # ... fewer where they would move more than this in all ...
MIN_CALLS = 10  # ... but at least this many
PAGE = 4096
SEEDS = {"shm": 1, "cma": 2, "peer": 3}


class Shape(NamedTuple):
    tensors: int
    block: int
    k: int

    @property
    def call_bytes(self) -> int:
        return self.tensors * self.block * self.k


def plan(tensors: Iterable[int] = TENSORS, blocks: Iterable[int] = BLOCK_SIZES,
         ks: Iterable[int] = BLOCKS_PER_CALL) -> List[Shape]:
    return [Shape(t, b, k) for b in blocks for t in tensors for k in ks]


def calls_for(shape: Shape, override: int = 0) -> int:
    """Timed calls of a shape: `override` when given, else `CALLS[k]`, fewer for the largest
    shapes (at most `MAX_TIMED_BYTES` in all, at least `MIN_CALLS`: the suite stays short)."""
    if override:
        return override
    return max(MIN_CALLS, min(CALLS.get(shape.k, 50), MAX_TIMED_BYTES // shape.call_bytes))


def block_sets(block: int, k: int) -> List[List[int]]:
    """The disjoint source block sets of k blocks the calls cycle through (seeded by `block`)."""
    order = torch.randperm(SOURCE_BLOCKS, generator=torch.Generator().manual_seed(block)).tolist()
    return [order[i:i + k] for i in range(0, SOURCE_BLOCKS - k + 1, k)]


_RAMPS: Dict[int, torch.Tensor] = {}


def _ramp(length: int) -> torch.Tensor:
    ramp = _RAMPS.get(length)
    if ramp is None:
        ramp = _RAMPS[length] = (torch.arange(length, dtype=torch.int64) * 7 % 256).to(torch.uint8)
    return ramp


def _mark(pages: torch.Tensor, tensor: int) -> torch.Tensor:
    """[..., 4] bytes heading each 4 KiB page: its index (two bytes), the tensor's (two)."""
    marks = torch.empty(*pages.shape, 4, dtype=torch.uint8)
    marks[..., 0], marks[..., 1] = pages % 256, pages // 256 % 256
    marks[..., 2], marks[..., 3] = tensor % 256, tensor // 256 % 256
    return marks


def pattern(tensor: int, start: int, length: int, seed: int) -> torch.Tensor:
    """Bytes [start, start + length) of source tensor `tensor` (page-aligned): a ramp offset by
    tensor and seed, with the page index and the tensor index in every 4 KiB page's first four
    bytes, so that a wrong block, tensor or offset is seen."""
    if start % PAGE or length % PAGE:
        raise ValueError("pattern ranges must be page-aligned")
    data = _ramp(length) + ((tensor * 17 + seed * 31) % 256)  # uint8 arithmetic wraps
    pages = torch.arange(start // PAGE, (start + length) // PAGE, dtype=torch.int64)
    data.view(-1, PAGE)[:, :4] = _mark(pages, tensor)
    return data


def expected_blocks(tensor: int, blocks: Sequence[int], block: int, seed: int) -> torch.Tensor:
    """What `blocks` of source tensor `tensor` hold, one row per block (`pattern`'s bytes)."""
    if block % PAGE:
        raise ValueError("blocks must be whole pages")
    per_block = block // PAGE
    data = (_ramp(block) + ((tensor * 17 + seed * 31) % 256)).repeat(len(blocks), 1)
    first = torch.tensor(list(blocks), dtype=torch.int64).view(-1, 1) * per_block
    pages = first + torch.arange(per_block, dtype=torch.int64)
    data.view(len(blocks), per_block, PAGE)[:, :, :4] = _mark(pages, tensor)
    return data


def wrong_tensors(dst: Sequence[torch.Tensor], shape: Shape, blocks: Sequence[int],
                  seed: int) -> List[int]:
    """Indices of the destination tensors (rows: blocks) whose first k blocks do not hold
    source `blocks` of the same tensor; [] when every byte is right."""
    return [t for t in range(shape.tensors)
            if not torch.equal(dst[t][:shape.k].reshape(shape.k, shape.block),
                               expected_blocks(t, blocks, shape.block, seed))]


def time_calls(calls: Sequence[Callable[[], object]], timed: int) -> List[float]:
    """Run every call of `calls` once (warm-up: maps and faults every source page), then
    `timed` calls cycling through them; seconds per timed call."""
    for call in calls:
        call()
    samples = []
    for i in range(timed):
        call = calls[i % len(calls)]
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def stats(samples: Sequence[float], nbytes: int) -> dict:
    """p50 / p99 in µs and GB/s at the p50."""
    ordered = sorted(samples)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50_us": round(p50 * 1e6, 1), "p99_us": round(p99 * 1e6, 1),
            "gbps": round(nbytes / p50 / 1e9, 3)}


def row(transport: str, op: str, shape: Shape, calls: int, timing: dict, checked: bool) -> dict:
    return {"suite": "model", "transport": transport, "op": op, "tensors": shape.tensors,
            "block_bytes": shape.block, "blocks": shape.k, "call_bytes": shape.call_bytes,
            "calls": calls, **timing, "checked": checked}


def stamp_memcpy(rows: List[dict]) -> List[dict]:
    """Add `memcpy_gbps` and `ratio` (gbps / memcpy_gbps) to the model rows that have a memcpy
    row of the same shape in `rows` (the memcpy rows get ratio 1)."""
    measured = [r for r in rows if r.get("suite") == "model" and "p50_us" in r]
    anchor = {_key(r): r["gbps"] for r in measured if r["transport"] == "memcpy"}
    for r in measured:
        if _key(r) in anchor:
            r["memcpy_gbps"] = anchor[_key(r)]
            r["ratio"] = round(r["gbps"] / anchor[_key(r)], 3) if anchor[_key(r)] else None
    return rows


def _key(r: dict) -> Tuple[int, int, int]:
    return r["tensors"], r["block_bytes"], r["blocks"]


def fit(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """Least squares y = a + b x; (a, b)."""
    n = len(points)
    sx = sum(x for x, _ in points)
    sy = sum(y for _, y in points)
    sxx = sum(x * x for x, _ in points)
    sxy = sum(x * y for x, y in points)
    b = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    return (sy - b * sx) / n, b


def fit_rows(rows: List[dict], k: int = 1) -> List[dict]:
    """Per transport and block size, p50 µs per call = fixed + per_tensor x tensors, fit by
    least squares over the k-block rows with at least two tensor counts."""
    points: Dict[Tuple[str, int], List[Tuple[int, float]]] = {}
    for r in rows:
        if r.get("suite") == "model" and r.get("blocks") == k and "p50_us" in r:
            points.setdefault((r["transport"], r["block_bytes"]), []).append(
                (r["tensors"], r["p50_us"]))
    out = []
    for (transport, block), pts in points.items():
        if len({x for x, _ in pts}) < 2:
            continue
        fixed, per_tensor = fit(pts)
        worst = max(abs(y - fixed - per_tensor * x) for x, y in pts)
        out.append({"suite": "model", "transport": transport, "op": f"fit_p50_k{k}",
                    "block_bytes": block, "tensors": ",".join(str(x) for x, _ in sorted(pts)),
                    "fixed_us": round(fixed, 1), "per_tensor_us": round(per_tensor, 3),
                    "max_residual_us": round(worst, 1)})
    return out
