"""Release notices, requesting side (spec §14.3): after a pull through a request key the owner
must learn which tensors were pulled, so that it releases the key; the caller of the pull does
not wait a round trip for that.

A notice is queued on its link once the bytes have arrived. Every later `Resolve` on the link
carries the queued notices and the owner applies them before it answers, so a second pull of a
released key fails as it must. The engine's `ReleaseSender` thread sends whatever no request
carried within `LINGER_S`, one `Release` per link, retrying with backoff while the link lives; unlink
and finalize send what is left first. A notice leaves the queue only once the owner answered a
message that carried it; one delivered twice changes nothing (`messages.Pulled`).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from ..status import LLMException
from .messages import MAX_RELEASES, Pulled, Release

if TYPE_CHECKING:
    from .link import Link

logger = logging.getLogger(__name__)

RETRY_FIRST_S, RETRY_MAX_S = 0.05, 2.0  # backoff after a failed send, doubling
# A notice waits this long for the link's next request to carry it before it is sent alone:
# back-to-back pulls then cost one round trip each, not one plus a Release competing with it.
LINGER_S = 0.005


class ReleaseQueue:
    """The notices of one link that the owner has not acknowledged, oldest first."""

    def __init__(self, wake: Callable[[], None] = lambda: None):
        self._lock = threading.Lock()
        self._notices: Dict[int, Tuple[float, Pulled]] = {}  # id -> (queued at, notice)
        self._ids = itertools.count()
        self._wake = wake
        self.failures = 0  # sends failed in a row (sender thread only)
        self.retry_at = 0.0

    def add(self, notice: Pulled) -> None:
        with self._lock:
            # Only notices no message could deliver pile up: the owner has not answered a
            # single request of this link for all of them.
            while len(self._notices) >= MAX_RELEASES:
                _, lost = self._notices.pop(next(iter(self._notices)))
                logger.error("dropping the release notice of key %s: %d notices wait for an "
                             "owner that does not answer; it keeps that cache until "
                             "remove_cache_key", lost.key, MAX_RELEASES)
            self._notices[next(self._ids)] = (time.monotonic(), notice)
        self._wake()

    def pending(self) -> Tuple[List[int], List[Pulled]]:
        """(ids, notices) of everything queued now; `acknowledged(ids)` once delivered."""
        with self._lock:
            return list(self._notices), [notice for _, notice in self._notices.values()]

    def oldest(self) -> Optional[float]:
        """When the oldest queued notice was queued (None: none is)."""
        with self._lock:
            return next(iter(self._notices.values()))[0] if self._notices else None

    def acknowledged(self, ids: List[int]) -> None:
        if ids:
            with self._lock:
                for notice_id in ids:
                    self._notices.pop(notice_id, None)

    def __len__(self) -> int:
        return len(self._notices)


def deliver(link: "Link", timeout_s: float) -> bool:
    """Send the link's queued notices in one `Release`; True once none is left."""
    queue = link.releases
    ids, notices = queue.pending()
    if not ids:
        return True
    if link.rpc is None or link.broken:
        return False
    try:
        link.rpc.call(Release(session=link.session, pulled=notices), timeout_s)
    except LLMException as exc:
        if not queue.failures:
            logger.warning("cluster %d was not told that %d request key(s) were pulled (%s); "
                           "retrying", link.cluster_id, len(ids), exc)
        queue.failures += 1
        queue.retry_at = time.monotonic() + min(RETRY_FIRST_S * 2 ** (queue.failures - 1),
                                                RETRY_MAX_S)
        return False
    queue.failures, queue.retry_at = 0, 0.0
    queue.acknowledged(ids)
    return True


class ReleaseSender:
    """One thread per engine delivers the notices that no `Resolve` took along."""

    def __init__(self, links: Callable[[], List["Link"]], name: str, timeout_s: float):
        self._links = links
        self._timeout_s = timeout_s  # of one send
        self._wakeup = threading.Event()
        self._wakes_at = float("inf")  # when the thread looks next without being woken
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def wake(self) -> None:
        """A notice was queued: look at it within `LINGER_S` (a thread switch per pull only
        when the thread would not look by then anyway)."""
        if self._wakes_at > time.monotonic() + LINGER_S:
            self._wakeup.set()

    def _run(self) -> None:
        wait: Optional[float] = None
        while True:
            if wait is not None:
                self._wakes_at = time.monotonic() + wait
            self._wakeup.wait(wait)
            self._wakeup.clear()
            # Until the scan below is done, a notice queued meanwhile must wake the thread.
            self._wakes_at = float("inf")
            if self._stopping:
                return
            wait = None
            for link in self._links():
                queue = link.releases
                oldest = queue.oldest()
                if oldest is None:
                    continue
                now = time.monotonic()
                due = max(queue.retry_at, oldest + LINGER_S)
                if due <= now:
                    if deliver(link, self._timeout_s):
                        continue
                    due = queue.retry_at
                if link.rpc is not None and not link.broken:  # try (again) later
                    left = max(due - now, 0.001)
                    wait = left if wait is None else min(wait, left)

    def close(self) -> None:
        self._stopping = True
        self._wakes_at = float("inf")
        self._wakeup.set()
        self._thread.join(timeout=self._timeout_s + 1)
