"""Core state of one engine: cache entries, key bindings and lifetimes (spec §14).

Keys are matched by their engine identity, never by Python equality: a request key is
`("req", req_id, model_id)`, a prefix key `("prefix", prefix_id, model_id)` in its own
namespace, and a blocks key `("req", 2**64-1, model_id)`. The cluster id only routes.

An allocated contiguous cache lives while its cache-id reference (dropped by
`deallocate_cache`) or any bound key remains. Memory is given back only when nothing refers to
the entry *and* no copy is using it (pins), so a transfer in flight never sees its pages reused.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from .descriptors import Geometry, Region
from .fences import fence_table
from ..keys import INVALID_ID, CacheKey
from ..status import LLMStatusCode, fail, raise_if_false

KeyId = Tuple[str, int, int]


def key_identity(key: CacheKey) -> KeyId:
    if key.prefix_id != INVALID_ID:
        return ("prefix", key.prefix_id, key.model_id)
    return ("req", key.req_id, key.model_id)


def blocks_key_identity(model_id: int) -> KeyId:
    return ("req", INVALID_ID, model_id)


def is_padding(identity: KeyId) -> bool:
    return identity[0] == "req" and identity[1] == INVALID_ID


@dataclasses.dataclass(eq=False)
class CacheEntry:
    """One managed cache: geometry, memory (raw uint8 tensor per cache tensor), lifetime."""

    cache_id: int
    num_tensors: int
    shape: Tuple[int, ...]
    data_type: object
    placement: object
    is_blocks: bool
    owned: bool
    remote_accessible: bool
    tensor_bytes: int
    raw: List[torch.Tensor]
    release_memory: Optional[Callable[[], None]] = None
    shm_name: str = ""   # /dev/shm file holding the memory (allocated CPU caches), else ""
    shm_base: int = 0    # address where that file is mapped in this process
    handle_valid: bool = True
    keys: Set[KeyId] = dataclasses.field(default_factory=set)
    pins: int = 0
    writers: int = 0
    retired: bool = False
    fence: Optional[Tuple[int, int]] = None  # (offset in the fence table, value): fences.py
    _regions: Optional[Dict[int, Region]] = None  # regions(), worked out at its first call

    @property
    def slots(self) -> int:
        """Batch slots (contiguous) or blocks (blocks cache): always dimension 0."""
        return self.shape[0]

    @property
    def stride(self) -> int:
        return self.tensor_bytes // self.shape[0]

    @property
    def addrs(self) -> List[int]:
        return [tensor.data_ptr() for tensor in self.raw]

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.num_tensors, self.slots, self.tensor_bytes, self.is_blocks)

    def regions(self) -> Dict[int, Region]:
        """Every tensor's region by index (the memory of an entry never moves): do not modify."""
        if self._regions is None:
            self._regions = {index: self.region(index) for index in range(self.num_tensors)}
        return self._regions

    def region(self, index: int) -> Region:
        """Where tensor `index` lives, as a peer needs to know it."""
        raw = self.raw[index]
        address = raw.data_ptr()
        return Region(address, raw.numel(), str(raw.device), self.shm_name,
                      address - self.shm_base if self.shm_name else 0)


@dataclasses.dataclass(eq=False)
class KeyBinding:
    entry: CacheEntry
    slot: int
    releasable: bool  # a request key of an allocated contiguous cache: pulls release it
    pending: Set[int]  # tensor indices not yet pulled through this key


class CacheTable:
    def __init__(self):
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self._waiting = 0  # threads waiting on _changed: copies notify only when some do
        self._next_id = 1
        self._entries: Dict[int, CacheEntry] = {}
        self._bindings: Dict[KeyId, KeyBinding] = {}
        # Called under the lock when an entry stops being what a peer may have cached for it
        # (retired, or its blocks key rebound): the link layer tells those peers (control/invalidation.py).
        self.on_forget: Optional[Callable[[CacheEntry], None]] = None

    # ---- ids and lookups -------------------------------------------------------------------
    def new_id(self) -> int:
        """Ids start at 1 and are never reused; a call failing later has still consumed one."""
        with self.lock:
            cache_id = self._next_id
            self._next_id += 1
            return cache_id

    def get(self, cache_id: int) -> CacheEntry:
        """The entry behind a live local handle, else `LLM_KV_CACHE_NOT_EXIST`."""
        with self.lock:
            entry = self._entries.get(cache_id)
            if entry is None or not entry.handle_valid:
                fail(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, "cache %d does not exist", cache_id)
            return entry

    def lookup_by_id(self, cache_id: int) -> Optional[CacheEntry]:
        """A live entry by id for a remote request (kept alive by keys after deallocation)."""
        with self.lock:
            return self._entries.get(cache_id)

    def binding(self, identity: KeyId) -> Optional[KeyBinding]:
        with self.lock:
            return self._bindings.get(identity)

    def binding_of_slot(self, entry: CacheEntry, slot: int) -> Optional[KeyBinding]:
        with self.lock:
            for identity in entry.keys:
                found = self._bindings.get(identity)
                if found is not None and found.slot == slot:
                    return found
            return None

    def keyed_slots(self, entry: CacheEntry) -> List[int]:
        """Slots of `entry` that a request or prefix key is bound to."""
        with self.lock:
            return sorted({self._bindings[identity].slot for identity in entry.keys
                           if not is_padding(identity)})

    def entries(self) -> List[CacheEntry]:
        with self.lock:
            return list(self._entries.values())

    def bound_keys(self) -> Dict[KeyId, Tuple[int, int]]:
        """identity -> (cache_id, slot); a snapshot for tests and diagnostics."""
        with self.lock:
            return {ident: (b.entry.cache_id, b.slot) for ident, b in self._bindings.items()}

    # ---- adding caches ---------------------------------------------------------------------
    def add(self, entry: CacheEntry, keys: Sequence[CacheKey], allocated: bool) -> None:
        """Add `entry` and bind `keys[i]` to slot i; on a key error nothing is added."""
        identities = [key_identity(key) for key in keys]
        with self.lock:
            raise_if_false(len(identities) <= entry.slots,
                           "%d cache keys for a cache of %d batch slots", len(identities), entry.slots)
            seen: Set[KeyId] = set()
            for identity in identities:
                # Upstream applies these checks to padding keys too when allocating.
                if is_padding(identity) and not allocated:
                    continue
                raise_if_false(identity not in seen, "duplicate cache key %s", identity)
                raise_if_false(identity not in self._bindings, "cache key %s is already bound", identity)
                seen.add(identity)
            self._entries[entry.cache_id] = entry
            entry.fence = fence_table().issue()
            for slot, identity in enumerate(identities):
                if is_padding(identity):
                    continue
                releasable = allocated and identity[0] == "req"
                self._bindings[identity] = KeyBinding(entry, slot, releasable, set(range(entry.num_tensors)))
                entry.keys.add(identity)

    def add_blocks(self, entry: CacheEntry, model_id: Optional[int], replace: bool) -> None:
        """Add a blocks cache, bound to its blocks key when `model_id` is given.

        Registration rebinds an existing blocks key to the newest cache (`replace`);
        allocation rejects it.
        """
        with self.lock:
            identity = None if model_id is None else blocks_key_identity(model_id)
            if identity is not None:
                old = self._bindings.get(identity)
                raise_if_false(old is None or replace, "blocks cache key of model_id %d is already bound",
                               model_id)
                if old is not None:
                    self._unbind(identity)
            self._entries[entry.cache_id] = entry
            entry.fence = fence_table().issue()
            if identity is not None:
                self._bindings[identity] = KeyBinding(entry, 0, False, set())
                entry.keys.add(identity)

    # ---- releasing -------------------------------------------------------------------------
    def release_handle(self, entry: CacheEntry) -> None:
        """`deallocate_*`: invalidate the handle; free now or when the last key goes."""
        with self.lock:
            if not entry.owned or not entry.handle_valid:
                return
            entry.handle_valid = False
            if entry.is_blocks:
                for identity in list(entry.keys):
                    self._unbind(identity)
            elif entry.keys:  # kept alive by keys, but no longer reachable by its cache id
                self._forget(entry)
            self._retire_if_unreferenced(entry)

    def remove_key(self, key: CacheKey) -> None:
        """`remove_cache_key`: only keys of allocated contiguous caches are releasable."""
        identity = key_identity(key)
        with self.lock:
            binding = self._bindings.get(identity)
            if binding is None or not binding.entry.owned or binding.entry.is_blocks:
                return
            self._unbind(identity)
            self._retire_if_unreferenced(binding.entry)

    def mark_pulled(self, binding: KeyBinding, tensor_indices: Iterable[int]) -> None:
        """A peer finished pulling these tensors through a request key; release it when all are."""
        with self.lock:
            if not binding.releasable or self._bindings.get(self._identity_of(binding)) is not binding:
                return
            binding.pending.difference_update(tensor_indices)
            if not binding.pending:
                self._unbind(self._identity_of(binding))
                self._retire_if_unreferenced(binding.entry)

    def drop(self, cache_id: int) -> Optional[CacheEntry]:
        """`unregister_cache`: remove the entry and all its keys at once."""
        with self.lock:
            entry = self._entries.get(cache_id)
            if entry is None:
                return None
            for identity in list(entry.keys):
                self._unbind(identity)
            entry.handle_valid = False
            self._retire(entry)
            return entry

    def clear(self) -> None:
        with self.lock:
            for cache_id in list(self._entries):
                self.drop(cache_id)

    # ---- pins: entries in use by a copy ----------------------------------------------------
    def pinned(self, reading: Sequence[CacheEntry], writing: Sequence[CacheEntry] = ()
               ) -> "_Pins":
        """`with table.pinned(reading, writing):` keeps the memory of these entries while a copy
        uses it; a retired entry (freed, or about to be) is refused with
        `LLM_KV_CACHE_NOT_EXIST`: take its `raw` tensors only inside this block."""
        return _Pins(self, reading, writing)

    def _pin(self, reading: Sequence[CacheEntry], writing: Sequence[CacheEntry]) -> None:
        with self.lock:
            for entry in (*reading, *writing):
                if entry.retired:
                    fail(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, "cache %d does not exist (it was "
                         "deallocated or unregistered)", entry.cache_id)
            for entry in (*reading, *writing):
                entry.pins += 1
            for entry in writing:
                entry.writers += 1

    def _unpin(self, reading: Sequence[CacheEntry], writing: Sequence[CacheEntry]) -> None:
        with self.lock:
            for entry in writing:
                entry.writers -= 1
            for entry in (*reading, *writing):
                entry.pins -= 1
                if entry.retired and not entry.pins:
                    self._free_memory(entry)
            if self._waiting:
                self._changed.notify_all()

    def hold(self, entries: Sequence[CacheEntry]) -> Callable[[], None]:
        """Keep the memory of `entries` from being freed until the returned callable runs (once):
        a transfer abandoned after a timeout may still touch it."""
        with self.lock:
            for entry in entries:
                entry.pins += 1
        released = []

        def release() -> None:
            with self.lock:
                if released:
                    return
                released.append(True)
                for entry in entries:
                    entry.pins -= 1
                    if entry.retired and not entry.pins:
                        self._free_memory(entry)
                self._changed.notify_all()
        return release

    def wait_unpinned(self, entry: CacheEntry, timeout_s: float) -> bool:
        """Wait until no copy uses `entry` and no peer may still (its memory is let go);
        False on timeout."""
        return self._wait_for(lambda: entry.pins == 0, timeout_s)

    def wait_no_writers(self, entry: CacheEntry, timeout_s: float) -> bool:
        """Wait until no transfer is writing into `entry`; False on timeout."""
        return self._wait_for(lambda: entry.writers == 0, timeout_s)

    def _wait_for(self, predicate, timeout_s: float) -> bool:
        with self.lock:
            self._waiting += 1
            try:
                return self._changed.wait_for(predicate, timeout_s)
            finally:
                self._waiting -= 1

    def identity_of(self, binding: KeyBinding) -> Optional[KeyId]:
        with self.lock:
            return self._identity_of(binding)

    # ---- internals -------------------------------------------------------------------------
    def _identity_of(self, binding: KeyBinding) -> Optional[KeyId]:
        for identity in binding.entry.keys:
            if self._bindings.get(identity) is binding:
                return identity
        return None

    def _unbind(self, identity: KeyId) -> None:
        binding = self._bindings.pop(identity)
        binding.entry.keys.discard(identity)
        if is_padding(identity):  # a blocks key: peers may have cached what it named
            self._forget(binding.entry)

    def _retire_if_unreferenced(self, entry: CacheEntry) -> None:
        if not entry.handle_valid and not entry.keys:
            self._retire(entry)

    def _retire(self, entry: CacheEntry) -> None:
        self._entries.pop(entry.cache_id, None)
        entry.retired = True
        self._forget(entry)  # may hold the memory until peers dropped their cached descriptors
        if not entry.pins:
            self._free_memory(entry)

    def _forget(self, entry: CacheEntry) -> None:
        """What peers kept about `entry` no longer holds: its fence word drops to 0 at once (a
        live entry gets a new one) and the link layer tells them."""
        if entry.fence is not None:
            fence_table().revoke(entry.fence[0])
        entry.fence = None if entry.retired else fence_table().issue()
        if self.on_forget is not None:
            self.on_forget(entry)

    @staticmethod
    def _free_memory(entry: CacheEntry) -> None:
        release, entry.release_memory = entry.release_memory, None
        entry.raw = []
        if release is not None:
            release()


class _Pins:
    """(A class, not a generator: every copy enters one.)"""

    __slots__ = ("_table", "_reading", "_writing")

    def __init__(self, table: CacheTable, reading, writing):
        self._table, self._reading, self._writing = table, reading, writing

    def __enter__(self) -> None:
        self._table._pin(self._reading, self._writing)

    def __exit__(self, *exc) -> None:
        self._table._unpin(self._reading, self._writing)
