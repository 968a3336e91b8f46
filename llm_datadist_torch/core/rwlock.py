"""A small readers-writer lock: API calls share it, `finalize` takes it exclusively."""
from __future__ import annotations

import contextlib
import threading


class ReadWriteLock:
    def __init__(self):
        self._held = threading.local()  # this thread's shared depth: re-entry never waits
        self._lock = threading.Lock()  # taken directly on the fast paths (no Python frames)
        self._cond = threading.Condition(self._lock)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def shared(self) -> "_Shared":
        """`with lock.shared():` (a class, not a generator: every API call enters it)."""
        return _Shared(self)

    def _acquire_shared(self) -> int:
        depth = getattr(self._held, "depth", 0)
        with self._lock:
            # Writers go first so a stream of calls cannot starve finalize(); a thread that
            # already holds the lock (e.g. a KvCache freed by the GC inside a call) re-enters.
            while depth == 0 and (self._writer or self._writers_waiting):
                self._cond.wait()
            self._readers += 1
        self._held.depth = depth + 1
        return depth

    def _release_shared(self, depth: int) -> None:
        self._held.depth = depth
        with self._lock:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Shared:
    __slots__ = ("_lock", "_depth")

    def __init__(self, lock: ReadWriteLock):
        self._lock = lock

    def __enter__(self) -> None:
        self._depth = self._lock._acquire_shared()

    def __exit__(self, *exc) -> None:
        self._lock._release_shared(self._depth)
