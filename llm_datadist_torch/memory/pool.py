"""Page-granular first-fit allocator for one memory arena (spec §6.4, §26.3).

Pure bookkeeping: it hands out byte offsets; the arena owns the memory. Freed ranges are
merged with their neighbours so space is reused.
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Sequence, Tuple


class PageAllocator:
    def __init__(self, total_bytes: int, page_bytes: int):
        self.page_bytes = page_bytes
        self.total_pages = total_bytes // page_bytes
        self._free: List[Tuple[int, int]] = [(0, self.total_pages)] if self.total_pages else []
        self._used: Dict[int, int] = {}  # start page -> page count

    @property
    def free_bytes(self) -> int:
        return sum(count for _, count in self._free) * self.page_bytes

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values()) * self.page_bytes

    def pages_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.page_bytes))

    def allocate_many(self, sizes: Sequence[int]) -> Optional[List[int]]:
        """Byte offsets for every size, or None (and nothing allocated) if they do not fit."""
        offsets: List[int] = []
        for size in sizes:
            start = self._take(self.pages_for(size))
            if start is None:
                for offset in offsets:
                    self.free(offset)
                return None
            offsets.append(start * self.page_bytes)
        return offsets

    def free(self, offset: int) -> None:
        start = offset // self.page_bytes
        count = self._used.pop(start)
        index = bisect.bisect_left(self._free, (start, 0))
        if index < len(self._free) and self._free[index][0] == start + count:
            count += self._free.pop(index)[1]
        if index > 0 and sum(self._free[index - 1]) == start:
            start, previous = self._free.pop(index - 1)
            count += previous
            index -= 1
        self._free.insert(index, (start, count))

    def _take(self, pages: int) -> Optional[int]:
        for index, (start, count) in enumerate(self._free):
            if count >= pages:
                if count == pages:
                    self._free.pop(index)
                else:
                    self._free[index] = (start + pages, count - pages)
                self._used[start] = pages
                return start
        return None


class MemoryPool:
    """An arena plus its allocator: the memory behind `mem_pool_cfg` / `host_mem_pool_cfg`."""

    def __init__(self, arena, page_bytes: int):
        self.arena = arena
        self.allocator = PageAllocator(arena.nbytes, page_bytes)

    def allocate(self, sizes: Sequence[int]):
        """(offsets, views) for every size, or None when the pool cannot fit them all."""
        offsets = self.allocator.allocate_many(sizes)
        if offsets is None:
            return None
        return offsets, [self.arena.slice(o, n) for o, n in zip(offsets, sizes)]

    def free(self, offsets: Sequence[int]) -> None:
        for offset in offsets:
            self.allocator.free(offset)

    def close(self) -> None:
        self.arena.close()
