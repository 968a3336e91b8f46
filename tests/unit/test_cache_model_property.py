"""Stateful property test: a real v2 `LLMDataDist` against a plain-Python model.

Random sequences of pool allocations, registrations, local copies, frees and key removals run on
both; after every step the cache contents, key bindings, live entries and pool accounting must
agree (spec §14, §15.2-15.9, §15.15-15.17, §26.11, §26.13).

The model restates the rules independently of the library code: pool memory is a page bitmap
with "lowest run of free pages that is long enough" (the same placement as the library's
first-fit free list, so addresses and out-of-memory outcomes are predicted exactly), cache
contents are numpy byte arrays, and lifetimes follow §14.3/§14.4.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llm_datadist_torch import (BlocksCacheKey, Cache, CacheDesc, CacheKey, DataType, LLMDataDist,
                                LLMRole, LLMStatusCode, Placement)
from helpers import raises_llm, shm_files

# 64 pages: big enough for several caches, small enough that random sequences run it full
# and fragment it (with 1 MiB pools they hardly ever do).
POOL_BYTES = 256 << 10
PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT
INVALID = 2**64 - 1

PARAM = LLMStatusCode.LLM_PARAM_INVALID
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
OOM = {Placement.DEVICE: LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY,
       Placement.HOST: LLMStatusCode.LLM_OUT_OF_MEMORY}

# (DataType, element bytes, torch dtype of the view); DT_STRING views are uint8 [..., 16].
DTYPES = [
    (DataType.DT_UINT8, 1, torch.uint8),
    (DataType.DT_FLOAT16, 2, torch.float16),
    (DataType.DT_INT32, 4, torch.int32),
    (DataType.DT_FLOAT, 4, torch.float32),
    (DataType.DT_STRING, 16, torch.uint8),
]
# Per-slot element shapes of contiguous caches: tiny ones, sub-page and multi-page slots, so that
# with up to 4 slots x 2 tensors the pool both fits several caches and runs out.
SLOT_SHAPES = [[1], [7], [3, 5], [256], [50, 50], [2048], [8192]]
# Blocks caches draw a block size in bytes and divide it by the element size.
BLOCK_BYTES = [512, 4096, 12288]

clusters = st.sampled_from([0, 1, 7])  # cluster_id only routes; never part of key identity
request_keys = st.builds(lambda c, r, m: CacheKey(c, r, m), clusters, st.integers(0, 5),
                         st.integers(0, 1))
prefix_keys = st.builds(lambda c, r, p, m: CacheKey(c, r, m, p), clusters,
                        st.sampled_from([0, 3, INVALID]), st.integers(0, 3), st.integers(0, 1))
# Padding model ids 0..3 against blocks-key model ids 0..1: some padding keys collide (§14.2).
padding_keys = st.builds(lambda c, m: CacheKey(c, INVALID, m), clusters, st.integers(0, 3))
any_key = st.one_of(request_keys, request_keys, request_keys, prefix_keys, prefix_keys,
                    padding_keys)

KeyId = Tuple[str, int, int]


def identity(key: CacheKey) -> KeyId:
    """Engine identity (§11.3): prefix namespace when prefix_id is set, else request namespace."""
    if key.prefix_id != INVALID:
        return ("prefix", key.prefix_id, key.model_id)
    return ("req", key.req_id, key.model_id)


def is_padding(ident: KeyId) -> bool:
    return ident[0] == "req" and ident[1] == INVALID


def blocks_identity(model_id: int) -> KeyId:
    return ("req", INVALID, model_id)  # §13: a blocks key lives in the request namespace


def key_for(ident: KeyId, cluster: int) -> CacheKey:
    """A fresh CacheKey object with the given identity (bindings match by value, §11.3)."""
    kind, ident_id, model_id = ident
    if kind == "prefix":
        return CacheKey(cluster, 11, model_id, ident_id)
    return CacheKey(cluster, ident_id, model_id)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 alias of a contiguous tensor."""
    return tensor.reshape(-1).view(torch.uint8)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return as_bytes(tensor).cpu().numpy().copy()


class PageModel:
    """Pool pages as a bitmap; an allocation takes the lowest free run that is long enough."""

    def __init__(self, total_bytes: int):
        self.used = [False] * (total_bytes // PAGE)

    @staticmethod
    def pages(nbytes: int) -> int:
        return max(1, -(-nbytes // PAGE))

    @property
    def free_bytes(self) -> int:
        return self.used.count(False) * PAGE

    def take_many(self, sizes: List[int]) -> Optional[List[Tuple[int, int]]]:
        """(start page, count) per size, all or nothing."""
        used = list(self.used)
        taken = []
        for size in sizes:
            count = self.pages(size)
            start = next((s for s in range(len(used) - count + 1)
                          if not any(used[s:s + count])), None)
            if start is None:
                return None
            used[start:start + count] = [True] * count
            taken.append((start, count))
        self.used = used
        return taken

    def release(self, taken: List[Tuple[int, int]]) -> None:
        for start, count in taken:
            assert all(self.used[start:start + count])
            self.used[start:start + count] = [False] * count


@dataclasses.dataclass(eq=False)
class ModelCache:
    cache_id: int
    handle: Cache
    placement: Placement
    blocks: bool
    owned: bool  # allocated from a pool (vs registered caller memory)
    shape: Tuple[int, ...]
    view_dtype: torch.dtype
    string: bool
    tensor_bytes: int
    data: List[np.ndarray]
    pages: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    backing: List[torch.Tensor] = dataclasses.field(default_factory=list)
    alive: bool = True  # an engine entry exists
    handle_valid: bool = True  # the cache id reference (§14.3 item 1) is held
    invalidated: bool = False  # deallocate_* cleared `tensor_addrs`
    keys: Set[KeyId] = dataclasses.field(default_factory=set)

    @property
    def num_tensors(self) -> int:
        return len(self.data)

    @property
    def slots(self) -> int:
        return self.shape[0]

    @property
    def stride(self) -> int:
        return self.tensor_bytes // self.shape[0]

    @property
    def usable(self) -> bool:
        """Reachable through its handle (copy, views)."""
        return self.alive and self.handle_valid


def expect_code(code: LLMStatusCode, call, *args, **kwargs) -> None:
    with raises_llm(code):
        call(*args, **kwargs)
    note_outcome(code.name, depth=2)


def note_outcome(outcome: str, depth: int = 1) -> None:
    """Count `<rule>: <outcome>` (shown by --hypothesis-show-statistics) to judge coverage."""
    event(f"{sys._getframe(depth).f_code.co_name}: {outcome}")


class CacheModelMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.shm_before = set(shm_files())
        self.dd = LLMDataDist(LLMRole.PROMPT, 1)
        pool = '{"memory_size": %d, "page_shift": %d}' % (POOL_BYTES, PAGE_SHIFT)
        self.dd.init({"llm.EnableCacheManager": "1", "llm.MemPoolConfig": pool,
                      "llm.HostMemPoolConfig": pool})
        self.cm = self.dd.cache_manager
        self.engine = self.cm._engine
        self.pools = {p: PageModel(POOL_BYTES) for p in (Placement.DEVICE, Placement.HOST)}
        self.caches: Dict[int, ModelCache] = {}  # alive entries
        self.all_caches: List[ModelCache] = []  # every handle ever returned, dead ones too
        self.bindings: Dict[KeyId, Tuple[int, int]] = {}
        self.next_id = 1
        self.registered_bytes = 0

    def teardown(self):
        self.dd.finalize()
        assert set(shm_files()) <= self.shm_before, "finalize left /dev/shm arena files"

    # ---- model helpers ---------------------------------------------------------------------
    def _new_id(self) -> int:
        cache_id, self.next_id = self.next_id, self.next_id + 1
        return cache_id

    def _bind(self, entry: ModelCache, ident: KeyId, slot: int) -> None:
        self.bindings[ident] = (entry.cache_id, slot)
        entry.keys.add(ident)

    def _unbind(self, ident: KeyId) -> None:
        cache_id, _ = self.bindings.pop(ident)
        self.caches[cache_id].keys.discard(ident)

    def _retire(self, entry: ModelCache) -> None:
        """The entry is gone: keys dropped, pool pages back."""
        for ident in list(entry.keys):
            self._unbind(ident)
        entry.alive = False
        entry.handle_valid = False
        del self.caches[entry.cache_id]
        if entry.owned:
            self.pools[entry.placement].release(entry.pages)

    def _retire_if_unreferenced(self, entry: ModelCache) -> None:
        if not entry.handle_valid and not entry.keys:
            self._retire(entry)

    def _draw_geometry(self, data, blocks: bool, placement: Placement):
        dtype, elem, view_dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        num_tensors = data.draw(st.integers(1, 2), label="num_tensors")
        if not blocks:
            shape = [data.draw(st.integers(1, 4), label="slots")] + list(
                data.draw(st.sampled_from(SLOT_SHAPES), label="slot_shape"))
            return dtype, elem, view_dtype, shape, num_tensors
        block_bytes = data.draw(st.sampled_from(BLOCK_BYTES), label="block_bytes")
        # Often match a blocks cache on the other side, so that swap_blocks has partners.
        partner = self._pick(data, lambda c: c.blocks and c.placement != placement, "partner")
        if partner is not None and data.draw(st.booleans(), label="swap partner"):
            block_bytes, num_tensors = partner.stride, partner.num_tensors
        shape = [data.draw(st.integers(1, 8), label="blocks"), block_bytes // elem]
        return dtype, elem, view_dtype, shape, num_tensors

    def _draw_keys(self, data, slots: int) -> List[CacheKey]:
        count = data.draw(st.integers(0, slots), label="key count")
        if data.draw(st.integers(0, 7), label="too many keys") == 0:
            count = slots + 1
        keys = []
        for _ in range(count):
            if self.bindings and data.draw(st.integers(0, 5), label="reuse bound") == 0:
                ident = data.draw(st.sampled_from(sorted(self.bindings)), label="bound key")
                keys.append(key_for(ident, data.draw(clusters)))
            else:
                keys.append(data.draw(any_key, label="key"))
        return keys

    def _add(self, handle: Cache, placement, blocks, owned, shape, view_dtype, dtype, nbytes,
             data_arrays, pages=(), backing=()) -> ModelCache:
        entry = ModelCache(handle.cache_id, handle, placement, blocks, owned, tuple(shape),
                           view_dtype, dtype == DataType.DT_STRING, nbytes, data_arrays,
                           list(pages), list(backing))
        self.caches[entry.cache_id] = entry
        self.all_caches.append(entry)
        return entry

    def _pick(self, data, predicate, label: str) -> Optional[ModelCache]:
        choices = [c for c in self.all_caches if predicate(c)]
        return data.draw(st.sampled_from(choices), label=label) if choices else None

    def _note_oom(self, placement: Placement, nbytes: int, num_tensors: int) -> None:
        enough = self.pools[placement].free_bytes >= PageModel.pages(nbytes) * num_tensors * PAGE
        note_outcome("fragmented pool" if enough else "full pool", depth=2)

    def _arena_base(self, placement: Placement) -> int:
        return self.engine.pools[placement].arena.tensor.data_ptr()

    def _random_bytes(self, data, n: int, device) -> torch.Tensor:
        seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator).to(device)

    # ---- allocation ------------------------------------------------------------------------
    @rule(data=st.data(), placement=st.sampled_from([Placement.DEVICE, Placement.HOST]))
    def allocate_cache(self, data, placement):
        dtype, elem, view_dtype, shape, num_tensors = self._draw_geometry(data, False, placement)
        keys = self._draw_keys(data, shape[0])
        desc = CacheDesc(num_tensors, shape, dtype, placement)
        nbytes = math.prod(shape) * elem
        cache_id = self._new_id()  # consumed even when the call fails in the engine
        pages = self.pools[placement].take_many([nbytes] * num_tensors)
        if pages is None:  # memory is checked before keys (§14.2)
            self._note_oom(placement, nbytes, num_tensors)
            expect_code(OOM[placement], self.cm.allocate_cache, desc, keys)
            return
        idents = [identity(k) for k in keys]  # padding keys are checked too (§14.2 quirk)
        if (len(idents) > shape[0] or len(set(idents)) < len(idents)
                or any(i in self.bindings for i in idents)):
            self.pools[placement].release(pages)
            expect_code(PARAM, self.cm.allocate_cache, desc, keys)
            return
        handle = self.cm.allocate_cache(desc, keys)
        assert handle.cache_id == cache_id and not handle.is_blocks_cache
        base = self._arena_base(placement)
        assert handle.tensor_addrs == [base + start * PAGE for start, _ in pages]
        contents = [to_numpy(self.cm.get_cache_tensors(handle, t)[0]) for t in range(num_tensors)]
        entry = self._add(handle, placement, False, True, shape, view_dtype, dtype, nbytes,
                          contents, pages=pages)
        for slot, ident in enumerate(idents):
            if not is_padding(ident):  # padding keys only occupy their position
                self._bind(entry, ident, slot)
        note_outcome("ok")

    @rule(data=st.data(), placement=st.sampled_from([Placement.DEVICE, Placement.HOST]),
          pages=st.integers(1, 24), short=st.integers(0, PAGE - 1))
    def allocate_pages(self, data, placement, pages, short):
        """A keyless single-tensor cache of about `pages` pages: fills and fragments the pool."""
        desc = CacheDesc(1, [1, pages * PAGE - short], DataType.DT_UINT8, placement)
        cache_id = self._new_id()
        taken = self.pools[placement].take_many([desc.size])
        if taken is None:
            self._note_oom(placement, desc.size, 1)
            return expect_code(OOM[placement], self.cm.allocate_cache, desc)
        handle = self.cm.allocate_cache(desc)
        assert handle.cache_id == cache_id
        assert handle.tensor_addrs == [self._arena_base(placement) + taken[0][0] * PAGE]
        contents = [to_numpy(self.cm.get_cache_tensors(handle, 0)[0])]
        self._add(handle, placement, False, True, desc.shape, torch.uint8, DataType.DT_UINT8,
                  desc.size, contents, pages=taken)
        note_outcome("ok")

    @rule(data=st.data(), placement=st.sampled_from([Placement.DEVICE, Placement.HOST]),
          model_id=st.one_of(st.none(), st.integers(0, 1)))
    def allocate_blocks_cache(self, data, placement, model_id):
        dtype, elem, view_dtype, shape, num_tensors = self._draw_geometry(data, True, placement)
        desc = CacheDesc(num_tensors, shape, dtype, placement)
        key = None if model_id is None else BlocksCacheKey(data.draw(clusters), model_id)
        nbytes = math.prod(shape) * elem
        cache_id = self._new_id()
        pages = self.pools[placement].take_many([nbytes] * num_tensors)
        if pages is None:
            self._note_oom(placement, nbytes, num_tensors)
            expect_code(OOM[placement], self.cm.allocate_blocks_cache, desc, key)
            return
        if model_id is not None and blocks_identity(model_id) in self.bindings:
            self.pools[placement].release(pages)
            expect_code(PARAM, self.cm.allocate_blocks_cache, desc, key)
            return
        handle = self.cm.allocate_blocks_cache(desc, key)
        assert handle.cache_id == cache_id and handle.is_blocks_cache
        base = self._arena_base(placement)
        assert handle.tensor_addrs == [base + start * PAGE for start, _ in pages]
        contents = [to_numpy(self.cm.get_cache_tensors(handle, t)[0]) for t in range(num_tensors)]
        entry = self._add(handle, placement, True, True, shape, view_dtype, dtype, nbytes,
                          contents, pages=pages)
        if model_id is not None:
            self._bind(entry, blocks_identity(model_id), 0)
        note_outcome("ok")

    # ---- registration ----------------------------------------------------------------------
    def _backing(self, data, placement, nbytes: int, num_tensors: int):
        device = self.engine.memory_device(placement)
        return [self._random_bytes(data, nbytes, device) for _ in range(num_tensors)]

    @precondition(lambda self: self.registered_bytes < 4 << 20)
    @rule(data=st.data(), placement=st.sampled_from([Placement.DEVICE, Placement.HOST]))
    def register_cache(self, data, placement):
        dtype, elem, view_dtype, shape, num_tensors = self._draw_geometry(data, False, placement)
        keys = self._draw_keys(data, shape[0])
        nbytes = math.prod(shape) * elem
        backing = self._backing(data, placement, nbytes, num_tensors)
        desc = CacheDesc(num_tensors, shape, dtype, placement)
        addrs = [t.data_ptr() for t in backing]
        cache_id = self._new_id()
        # Registration skips padding keys; duplicates and bound keys are PARAM (§26.11).
        idents = [identity(k) for k in keys]
        bound = [i for i in idents if not is_padding(i)]
        if (len(idents) > shape[0] or len(set(bound)) < len(bound)
                or any(i in self.bindings for i in bound)):
            expect_code(PARAM, self.cm.register_cache, desc, addrs, keys)
            return
        handle = self.cm.register_cache(desc, addrs, keys)
        assert handle.cache_id == cache_id and handle.tensor_addrs == addrs
        self.registered_bytes += nbytes * num_tensors
        contents = [t.cpu().numpy().copy() for t in backing]
        entry = self._add(handle, placement, False, False, shape, view_dtype, dtype, nbytes,
                          contents, backing=backing)
        for slot, ident in enumerate(idents):
            if ident in bound:
                self._bind(entry, ident, slot)
        note_outcome("ok")

    @precondition(lambda self: self.registered_bytes < 4 << 20)
    @rule(data=st.data(), placement=st.sampled_from([Placement.DEVICE, Placement.HOST]),
          model_id=st.one_of(st.none(), st.integers(0, 1)))
    def register_blocks_cache(self, data, placement, model_id):
        dtype, elem, view_dtype, shape, num_tensors = self._draw_geometry(data, True, placement)
        nbytes = math.prod(shape) * elem
        backing = self._backing(data, placement, nbytes, num_tensors)
        desc = CacheDesc(num_tensors, shape, dtype, placement)
        key = None if model_id is None else BlocksCacheKey(data.draw(clusters), model_id)
        cache_id = self._new_id()
        handle = self.cm.register_blocks_cache(desc, [t.data_ptr() for t in backing], key)
        assert handle.cache_id == cache_id and handle.is_blocks_cache
        self.registered_bytes += nbytes * num_tensors
        contents = [t.cpu().numpy().copy() for t in backing]
        entry = self._add(handle, placement, True, False, shape, view_dtype, dtype, nbytes,
                          contents, backing=backing)
        if model_id is not None:
            ident = blocks_identity(model_id)
            if ident in self.bindings:  # registration rebinds to the newest cache (§14.2)
                self._unbind(ident)
                note_outcome("rebound blocks key")
            self._bind(entry, ident, 0)

    @rule(data=st.data())
    def unregister_cache(self, data):
        if self.caches and data.draw(st.booleans(), label="known id"):
            cache_id = data.draw(st.sampled_from(sorted(self.caches)), label="cache_id")
        else:
            cache_id = data.draw(st.integers(0, self.next_id + 1), label="cache_id")
        self.cm.unregister_cache(cache_id)
        entry = self.caches.get(cache_id)
        if entry is not None:  # drops the entry and all its keys, even an allocated one (§26.13)
            note_outcome("owned" if entry.owned else "registered")
            self._retire(entry)

    # ---- freeing ---------------------------------------------------------------------------
    @precondition(lambda self: self.all_caches)
    @rule(data=st.data())
    def deallocate(self, data):
        entry = data.draw(st.sampled_from(self.all_caches), label="cache")
        # Mostly the matching call; sometimes the wrong kind, which is PARAM before anything.
        blocks_call = entry.blocks if data.draw(st.integers(0, 5)) else not entry.blocks
        call = self.cm.deallocate_blocks_cache if blocks_call else self.cm.deallocate_cache
        if blocks_call != entry.blocks:
            expect_code(PARAM, call, entry.handle)
            return
        call(entry.handle)
        if not (entry.alive and entry.owned and entry.handle_valid):
            note_outcome("no-op")  # freed, unknown or registered: silent (§15.7, §15.8)
            return
        entry.handle_valid = False
        entry.invalidated = True
        if entry.blocks:  # freed now, blocks key dropped (§14.4)
            for ident in list(entry.keys):
                self._unbind(ident)
        note_outcome("deferred by keys" if entry.keys else "freed")
        self._retire_if_unreferenced(entry)

    @rule(data=st.data())
    def remove_cache_key(self, data):
        if self.bindings and data.draw(st.booleans(), label="bound key"):
            key = key_for(data.draw(st.sampled_from(sorted(self.bindings))), data.draw(clusters))
        else:
            key = data.draw(any_key, label="key")
        self.cm.remove_cache_key(key)
        found = self.bindings.get(identity(key))
        if found is None:
            return note_outcome("unknown key")
        entry = self.caches[found[0]]
        if not entry.owned or entry.blocks:  # keys of registered and blocks caches stay
            return note_outcome("kept")
        self._unbind(identity(key))
        note_outcome("frees cache" if not entry.handle_valid and not entry.keys else "unbound")
        self._retire_if_unreferenced(entry)

    # ---- local copies ----------------------------------------------------------------------
    @precondition(lambda self: any(not c.blocks for c in self.all_caches))
    @rule(data=st.data())
    def copy_cache(self, data):
        live_only = data.draw(st.integers(0, 7), label="live only") > 0  # else dead ones too

        def pick(label: str) -> ModelCache:
            live = live_only and self._pick(data, lambda c: not c.blocks and c.usable, label)
            return live or self._pick(data, lambda c: not c.blocks, label)

        dst, src = pick("dst"), pick("src")
        dst_b = data.draw(st.integers(0, dst.slots), label="dst_batch_index")
        src_b = data.draw(st.integers(0, src.slots), label="src_batch_index")
        stride = min(src.stride, dst.stride)
        offset = data.draw(st.one_of(st.just(0), st.integers(0, stride)), label="offset")
        size = data.draw(st.one_of(st.just(-1), st.just(0), st.integers(1, stride + 1)),
                         label="size")

        def call():
            self.cm.copy_cache(dst.handle, src.handle, dst_b, src_b, offset, size)

        if size == 0:
            return expect_code(PARAM, call)
        if not dst.usable or not src.usable:
            return expect_code(NOT_EXIST, call)
        n = src.stride - offset if size == -1 else size
        if (dst.num_tensors != src.num_tensors or src_b >= src.slots or dst_b >= dst.slots
                or (offset > 0 and (offset >= src.stride or offset >= dst.stride))
                or n > src.stride - offset or n > dst.stride - offset):
            return expect_code(PARAM, call)
        call()
        s0, d0 = src_b * src.stride + offset, dst_b * dst.stride + offset
        for t in range(dst.num_tensors):
            dst.data[t][d0:d0 + n] = src.data[t][s0:s0 + n].copy()
        note_outcome("ok")

    def _draw_indices(self, data, limit: int, count: int) -> List[int]:
        """Mostly valid indices in [0, limit); now and then one equal to `limit`."""
        indices = [data.draw(st.integers(0, limit - 1), label="index") for _ in range(count)]
        if indices and data.draw(st.integers(0, 6), label="bad index") == 0:
            indices[data.draw(st.integers(0, count - 1))] = limit
        return indices

    @precondition(lambda self: any(c.blocks for c in self.all_caches))
    @rule(data=st.data())
    def copy_blocks(self, data):
        entry = (self._pick(data, lambda c: c.blocks and c.usable, "cache")
                 if data.draw(st.integers(0, 7)) else None)
        entry = entry or self._pick(data, lambda c: True, "cache")
        n = entry.slots
        sources = self._draw_indices(data, n, data.draw(st.integers(0, 4), label="sources"))
        info: Dict[int, List[int]] = {}
        for src in sources:
            info[src] = self._draw_indices(data, n, data.draw(st.integers(0, 3), label="targets"))
        pairs = [(s, d) for s, targets in info.items() for d in targets]
        if not entry.blocks:
            return expect_code(PARAM, self.cm.copy_blocks, entry.handle, info)
        if not entry.usable:
            return expect_code(NOT_EXIST, self.cm.copy_blocks, entry.handle, info)
        if any(max(p) >= n for p in pairs):
            return expect_code(PARAM, self.cm.copy_blocks, entry.handle, info)
        self.cm.copy_blocks(entry.handle, info)
        stride = entry.stride
        for s, d in pairs:  # sequential, in dict order then list order (§15.16)
            for array in entry.data:
                array[d * stride:(d + 1) * stride] = array[s * stride:(s + 1) * stride].copy()
        note_outcome(f"ok, {len(pairs)} pairs")

    @precondition(lambda self: any(c.blocks for c in self.all_caches))
    @rule(data=st.data())
    def swap_blocks(self, data):
        blocks = [c for c in self.all_caches if c.blocks]
        pairs_ok = [(s, d) for s in blocks for d in blocks
                    if s.usable and d.usable and s.placement != d.placement
                    and s.stride == d.stride and s.num_tensors == d.num_tensors]
        if pairs_ok and data.draw(st.integers(0, 4)):
            src, dst = data.draw(st.sampled_from(pairs_ok), label="swap pair")
        else:
            src = data.draw(st.sampled_from(blocks), label="src")
            dst = data.draw(st.sampled_from(blocks), label="dst")
        count = data.draw(st.integers(0, 4), label="pairs")
        mapping = dict(zip(self._draw_indices(data, src.slots, count),
                           self._draw_indices(data, dst.slots, count)))

        def call():
            self.cm.swap_blocks(src.handle, dst.handle, mapping)

        if (src.stride != dst.stride or src.num_tensors != dst.num_tensors
                or any(s >= src.slots or d >= dst.slots for s, d in mapping.items())
                or src.placement == dst.placement):
            return expect_code(PARAM, call)
        if not src.usable or not dst.usable:
            return expect_code(NOT_EXIST, call)
        call()
        stride = src.stride
        for s, d in mapping.items():
            for t in range(src.num_tensors):
                dst.data[t][d * stride:(d + 1) * stride] = src.data[t][s * stride:(s + 1) * stride]
        note_outcome(f"ok {src.placement.name}->{dst.placement.name}, {len(mapping)} pairs")

    # ---- writes ----------------------------------------------------------------------------
    @precondition(lambda self: any(c.usable for c in self.caches.values()))
    @rule(data=st.data())
    def write(self, data):
        entry = self._pick(data, lambda c: c.usable, "cache")
        t = data.draw(st.integers(0, entry.num_tensors - 1), label="tensor")
        start = data.draw(st.integers(0, entry.tensor_bytes - 1), label="start")
        end = data.draw(st.integers(start + 1, min(entry.tensor_bytes, start + 70000)), label="end")
        if entry.backing and data.draw(st.booleans(), label="through caller tensor"):
            target = entry.backing[t]  # registered memory is the caller's own tensor
        else:
            target = as_bytes(self.cm.get_cache_tensors(entry.handle, t)[0])
        payload = self._random_bytes(data, end - start, target.device)
        target[start:end].copy_(payload)
        entry.data[t][start:end] = payload.cpu().numpy()

    @precondition(lambda self: any(not c.usable for c in self.all_caches))
    @rule(data=st.data())
    def view_of_dead_handle(self, data):
        entry = self._pick(data, lambda c: not c.usable, "cache")
        expect_code(NOT_EXIST, self.cm.get_cache_tensors, entry.handle, 0)

    # ---- invariants ------------------------------------------------------------------------
    @invariant()
    def keys_agree(self):
        assert self.engine.table.bound_keys() == self.bindings

    @invariant()
    def entries_and_contents_agree(self):
        entries = {e.cache_id: e for e in self.engine.table.entries()}
        assert set(entries) == set(self.caches)
        for cache_id, model in self.caches.items():
            entry = entries[cache_id]
            assert entry.handle_valid == model.handle_valid
            assert entry.keys == model.keys
            for t in range(model.num_tensors):
                if model.handle_valid:
                    view = self.cm.get_cache_tensors(model.handle, t)[0]
                    shape = model.shape + ((16,) if model.string else ())
                    assert tuple(view.shape) == shape and view.dtype == model.view_dtype
                else:  # deallocated but kept alive by a key: only the engine sees it
                    view = entry.raw[t]
                actual = to_numpy(view)
                assert np.array_equal(actual, model.data[t]), (cache_id, t)

    @invariant()
    def handles_agree(self):
        for model in self.all_caches:
            assert (model.handle.tensor_addrs == []) == model.invalidated, model.cache_id

    @invariant()
    def pools_agree(self):
        for placement, pages in self.pools.items():
            in_use = sum(count for c in self.caches.values() if c.owned and c.placement == placement
                         for _, count in c.pages)
            assert pages.free_bytes == POOL_BYTES - in_use * PAGE  # the model itself leaks nothing
            assert self.engine.pools[placement].allocator.free_bytes == pages.free_bytes


CacheModelMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCacheModel = CacheModelMachine.TestCase
