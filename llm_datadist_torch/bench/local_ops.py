"""The `local` suite: `copy_blocks` and `swap_blocks` on one instance, against memcpy.

One v2 `LLMDataDist` with a device and a host pool. For every block size it allocates a 2-tensor
(K and V) blocks cache on the device side and one on the host side, and times one API call that
moves `--total-mib` bytes as random, disjoint blocks:

* `copy_blocks`: device cache, `{src: [dst]}` for random source blocks to random other blocks;
* `swap_blocks_d2h` / `swap_blocks_h2d`: `{src: dst}` between the device and the host cache.

`memcpy_gbps` is the ceiling for the same number of bytes: one contiguous `dst.copy_(src)`
between pre-touched buffers on the same devices, timed alternately with the operation.
Both rotate through more than twice the 32 MiB L3, so no timed run finds its data in cache.
Each configuration is verified once; wrong bytes raise `DataMismatch`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Dict, List, Tuple

import torch

from .. import CacheDesc, DataType, LLMDataDist, LLMRole, Placement
from ..memory import copy as memory_copy
from .common import DataMismatch, gbps, median, timed

BLOCK_SIZES = (16 << 10, 128 << 10, 1 << 20, 2 << 20)
TENSORS = 2  # K and V
ROTATE_BYTES = 64 << 20  # data touched per rotation: twice the L3
PAGE_SHIFT = 16
WORD = 8  # caches are int64 so every 8-byte word can hold a distinct value
CLUSTER_ID = 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """Block geometry for one block size; a group is the disjoint set of blocks one call uses."""

    block: int  # bytes per block and tensor
    pairs: int  # (src, dst) block pairs per call
    groups: int  # calls rotate over this many disjoint groups

    @classmethod
    def for_block(cls, block: int, total_bytes: int) -> "Layout":
        pairs = max(1, total_bytes // (TENSORS * block))
        footprint = 2 * TENSORS * pairs * block  # source and destination bytes of one call
        return cls(block, pairs, max(1, -(-ROTATE_BYTES // footprint)))

    @property
    def total_bytes(self) -> int:
        return TENSORS * self.pairs * self.block

    @property
    def device_blocks(self) -> int:  # a source half and a destination half per group
        return 2 * self.pairs * self.groups

    @property
    def host_blocks(self) -> int:
        return self.pairs * self.groups


def _pool_cfg(nbytes: int) -> str:
    page = 1 << PAGE_SHIFT
    return json.dumps({"memory_size": -(-nbytes // page) * page + page, "page_shift": PAGE_SHIFT})


def _fill(views: List[torch.Tensor], salt: int) -> None:
    """Every word of every block of every tensor gets its own value (catches misplaced bytes)."""
    for index, view in enumerate(views):
        blocks, words = view.shape
        column = torch.arange(blocks, dtype=torch.int64).mul_(1 << 24)
        column.add_((salt * 16 + index) << 48)
        row = torch.arange(words, dtype=torch.int64)
        torch.add(column.unsqueeze(1).to(view.device), row.to(view.device), out=view)


@dataclasses.dataclass
class Op:
    """One timed operation: `call(group)` runs it; `pairs(group)` are its (src, dst) blocks."""

    name: str
    src: List[torch.Tensor]  # per-tensor block views the pairs read ...
    dst: List[torch.Tensor]  # ... and write
    pairs: Callable[[int], Tuple[torch.Tensor, torch.Tensor]]
    call: Callable[[int], None]


def _make_ops(manager, device_cache, host_cache, layout: Layout, seed: int) -> List[Op]:
    """copy_blocks and both swap directions, with their block maps built outside the timing."""
    generator = torch.Generator().manual_seed(seed)
    dev_src, dev_dst, host = [], [], []
    for group in range(layout.groups):
        perm = torch.randperm(2 * layout.pairs, generator=generator) + group * 2 * layout.pairs
        dev_src.append(perm[:layout.pairs])
        dev_dst.append(perm[layout.pairs:])
        host.append(torch.randperm(layout.pairs, generator=generator) + group * layout.pairs)
    copy_maps = [{s: [d] for s, d in zip(s_.tolist(), d_.tolist())}
                 for s_, d_ in zip(dev_src, dev_dst)]
    d2h_maps = [dict(zip(s_.tolist(), h_.tolist())) for s_, h_ in zip(dev_src, host)]
    h2d_maps = [dict(zip(h_.tolist(), d_.tolist())) for h_, d_ in zip(host, dev_dst)]
    dev_views = [manager.get_cache_tensors(device_cache, t)[0] for t in range(TENSORS)]
    host_views = [manager.get_cache_tensors(host_cache, t)[0] for t in range(TENSORS)]
    return [
        Op("copy_blocks", dev_views, dev_views, lambda g: (dev_src[g], dev_dst[g]),
           lambda g: manager.copy_blocks(device_cache, copy_maps[g])),
        Op("swap_blocks_d2h", dev_views, host_views, lambda g: (dev_src[g], host[g]),
           lambda g: manager.swap_blocks(device_cache, host_cache, d2h_maps[g])),
        Op("swap_blocks_h2d", host_views, dev_views, lambda g: (host[g], dev_dst[g]),
           lambda g: manager.swap_blocks(host_cache, device_cache, h2d_maps[g])),
    ]


def _verify(op: Op, block: int) -> None:
    """Scramble the destination blocks of group 0, run the op once, compare with the sources."""
    src_index, dst_index = op.pairs(0)
    for dst in op.dst:
        dst.index_fill_(0, dst_index.to(dst.device), -1)
    op.call(0)
    for t, (src, dst) in enumerate(zip(op.src, op.dst)):
        expected = src.index_select(0, src_index.to(src.device)).cpu()
        actual = dst.index_select(0, dst_index.to(dst.device)).cpu()
        if not torch.equal(expected, actual):
            bad = int((expected != actual).any(dim=1).sum())
            raise DataMismatch(f"{op.name}, {block} byte blocks, tensor {t}: {bad} of "
                               f"{len(src_index)} blocks differ from their source")


class Memcpy:
    """Contiguous `copy_` between pre-touched buffers, rotating over `groups` slices."""

    def __init__(self, nbytes: int, groups: int, src_device, dst_device):
        self.nbytes, self.groups = nbytes, groups
        self.src = torch.ones(nbytes * groups, dtype=torch.uint8, device=src_device)
        self.dst = torch.zeros(nbytes * groups, dtype=torch.uint8, device=dst_device)

    def call(self, group: int) -> None:
        lo, hi = group * self.nbytes, (group + 1) * self.nbytes
        self.dst[lo:hi].copy_(self.src[lo:hi])


def _measure(op: Op, memcpy: Memcpy, layout: Layout, repeats: int) -> Tuple[float, float]:
    """Median seconds of the op and of memcpy, timed alternately; group 0 was the warm-up."""
    devices = (op.src[0].device, op.dst[0].device)
    for group in range(layout.groups):  # warm-up (the op's warm-up is its verification run)
        memcpy.call(group)
    op_times, copy_times = [], []
    for repeat in range(repeats):
        group = (repeat + 1) % layout.groups
        op_times.append(timed(lambda: op.call(group), *devices))
        copy_times.append(timed(lambda: memcpy.call(group), *devices))
    return median(op_times), median(copy_times)


def _bench_block(datadist: LLMDataDist, layout: Layout, repeats: int,
                 memcpys: Dict[tuple, Memcpy]) -> List[dict]:
    manager = datadist.cache_manager
    words = layout.block // WORD
    device_cache = manager.allocate_blocks_cache(
        CacheDesc(TENSORS, [layout.device_blocks, words], DataType.DT_INT64, Placement.DEVICE))
    host_cache = manager.allocate_blocks_cache(
        CacheDesc(TENSORS, [layout.host_blocks, words], DataType.DT_INT64, Placement.HOST))
    try:
        ops = _make_ops(manager, device_cache, host_cache, layout, seed=layout.block)
        _fill(ops[0].src, salt=1)  # the device cache
        _fill(ops[1].dst, salt=2)  # the host cache
        rows = []
        for op in ops:
            src_device, dst_device = op.src[0].device, op.dst[0].device
            key = (str(src_device), str(dst_device))
            if key not in memcpys:
                memcpys[key] = Memcpy(layout.total_bytes, layout.groups, src_device, dst_device)
            _verify(op, layout.block)
            op_s, copy_s = _measure(op, memcpys[key], layout, repeats)
            rate, ceiling = gbps(layout.total_bytes, op_s), gbps(layout.total_bytes, copy_s)
            rows.append({
                "suite": "local", "op": op.name, "block_bytes": layout.block,
                "blocks": TENSORS * layout.pairs, "total_bytes": layout.total_bytes,
                "seconds": round(op_s, 6), "gbps": round(rate, 3), "memcpy_gbps": round(ceiling, 3),
                "ratio": round(rate / ceiling, 3), "repeats": repeats, "device": str(src_device),
                "copy_threads": memory_copy.COPY_THREADS, "torch_threads": torch.get_num_threads(),
            })
        return rows
    finally:
        manager.deallocate_blocks_cache(device_cache)
        manager.deallocate_blocks_cache(host_cache)


def run(args) -> List[dict]:
    layouts = [Layout.for_block(block, args.total_mib << 20) for block in BLOCK_SIZES]
    page = 1 << PAGE_SHIFT
    cache_bytes = lambda blocks, block: TENSORS * -(-blocks * block // page) * page  # noqa: E731
    config = {
        "llm.EnableCacheManager": "1",
        "llm.MemPoolConfig": _pool_cfg(max(cache_bytes(l.device_blocks, l.block) for l in layouts)),
        "llm.HostMemPoolConfig": _pool_cfg(max(cache_bytes(l.host_blocks, l.block)
                                               for l in layouts)),
    }
    datadist = LLMDataDist(LLMRole.PROMPT, CLUSTER_ID)
    datadist.init(config)
    try:
        memcpys: Dict[tuple, Memcpy] = {}  # per (src device, dst device); reused by block sizes
        rows = []
        for layout in layouts:
            if any((m.nbytes, m.groups) != (layout.total_bytes, layout.groups)
                   for m in memcpys.values()):
                memcpys.clear()  # a block size that does not divide the total moves other bytes
            rows += _bench_block(datadist, layout, args.repeats, memcpys)
        return rows
    finally:
        datadist.finalize()
