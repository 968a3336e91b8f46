"""Fence words: what lets a peer use an answer it kept without a round trip, and never wrongly.

Every cache of this process gets an 8-byte word holding a value never used before in this
process; the owner's answers about the cache carry the word's place and value. When the cache
goes away, or its key comes to name another cache, the word becomes 0 before the memory can be
freed. A requester reads the word one-sidedly, through the same transport as the data, after
it read (and before it writes) the cache's bytes: any other value than the one it was given
means the bytes may not be the cache's, and the call fails instead of returning them.

The words live in one /dev/shm file that stays for the life of the process, so a word outlives
the engine that set it: after `finalize` or a new `init`, every word an old answer names reads 0.
"""
from __future__ import annotations

import os
import secrets
import threading
from typing import Optional, Tuple

import torch

from ..memory.arena import MemoryArena
from ..status import LLMStatusCode, fail
from .descriptors import Region

WORD_BYTES = 8
WORDS = 1 << 16  # caches one process may hold at once (512 KiB of words)


class FenceTable:
    def __init__(self, words: int = WORDS):
        self._arena = MemoryArena.create(torch.device("cpu"), words * WORD_BYTES, tag="fence")
        self._words = self._arena.tensor.view(torch.int64)
        self._free = list(range(words - 1, -1, -1))
        # Values are never reused in a process; a random start keeps them apart across processes.
        self._next = secrets.randbits(62) | 1
        self._lock = threading.Lock()
        self.region = Region(self._arena.tensor.data_ptr(), self._arena.nbytes, "cpu",
                             self._arena.shm_path.rsplit("/", 1)[-1])

    def issue(self) -> Tuple[int, int]:
        """A word set to a fresh value: (byte offset in the table, value)."""
        with self._lock:
            if not self._free:
                fail(LLMStatusCode.LLM_OUT_OF_MEMORY, "more than %d caches in one process",
                     self._words.numel())
            word = self._free.pop()
            value = self._next
            self._next += 1
            self._words[word] = value
        return word * WORD_BYTES, value

    def revoke(self, offset: int) -> None:
        """The word at `offset` reads 0 from now on; its place may be issued again later."""
        with self._lock:
            self._words[offset // WORD_BYTES] = 0
            self._free.append(offset // WORD_BYTES)

    def close(self) -> None:
        self._arena.close()


_table: Optional[FenceTable] = None
_users = 0
_table_lock = threading.Lock()


def acquire() -> FenceTable:
    """The process's fence table, created for its first user (an engine)."""
    global _table, _users
    with _table_lock:
        if _table is None:
            _table = FenceTable()
        _users += 1
        return _table


def release() -> None:
    """An engine is done with the table; the last one removes it (every word reads 0 by then:
    its caches are gone). A table made later has other values, so old answers stay invalid."""
    global _table, _users
    with _table_lock:
        _users -= 1
        if _users == 0 and _table is not None:
            _table.close()
            _table = None


def fence_table() -> FenceTable:
    """The table of the engines alive now (an engine holds it from init to close)."""
    table = _table
    if table is None:
        fail(LLMStatusCode.LLM_FAILED, "no fence table: no engine is alive in this process")
    return table


def _after_fork_in_child() -> None:
    """A forked child shares the parent's file: it must never write or remove it."""
    global _table, _users
    _table, _users = None, 0


os.register_at_fork(after_in_child=_after_fork_in_child)
