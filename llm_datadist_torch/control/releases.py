"""Release notices, requesting side (spec §14.3): after a pull through a request key the owner
must learn which tensors were pulled, so that it releases the key; the caller of the pull does
not wait a round trip for that.

A notice is queued on its link once the bytes have arrived. Every later `Resolve` on the link
carries the queued notices and the owner applies them before it answers, so a second pull of a
released key fails as it must. The engine's `ReleaseSender` thread sends whatever is still
queued soon after, one `Release` per link, retrying with backoff while the link lives; unlink
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


class ReleaseQueue:
    """The notices of one link that the owner has not acknowledged, oldest first."""

    def __init__(self, wake: Callable[[], None] = lambda: None):
        self._lock = threading.Lock()
        self._notices: Dict[int, Pulled] = {}
        self._ids = itertools.count()
        self._wake = wake
        self.failures = 0  # sends failed in a row (sender thread only)
        self.retry_at = 0.0

    def add(self, notice: Pulled) -> None:
        with self._lock:
            # Only notices no message could deliver pile up: the owner has not answered a
            # single request of this link for all of them.
            while len(self._notices) >= MAX_RELEASES:
                lost = self._notices.pop(next(iter(self._notices)))
                logger.error("dropping the release notice of key %s: %d notices wait for an "
                             "owner that does not answer; it keeps that cache until "
                             "remove_cache_key", lost.key, MAX_RELEASES)
            self._notices[next(self._ids)] = notice
        self._wake()

    def pending(self) -> Tuple[List[int], List[Pulled]]:
        """(ids, notices) of everything queued now; `acknowledged(ids)` once delivered."""
        with self._lock:
            return list(self._notices), list(self._notices.values())

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
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def wake(self) -> None:
        self._wakeup.set()

    def _run(self) -> None:
        wait: Optional[float] = None
        while True:
            self._wakeup.wait(wait)
            self._wakeup.clear()
            if self._stopping:
                return
            wait = None
            for link in self._links():
                queue = link.releases
                if not len(queue):
                    continue
                now = time.monotonic()
                if queue.retry_at <= now and deliver(link, self._timeout_s):
                    continue
                if link.rpc is not None and not link.broken:  # try again later
                    left = max(queue.retry_at - now, RETRY_FIRST_S)
                    wait = left if wait is None else min(wait, left)

    def close(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=self._timeout_s + 1)
