"""Telling peers what they must forget: when a cache that a peer may have kept an answer about
goes away (or its key is rebound), the owner tells that peer, and holds the memory until then."""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Dict, List

from ..core.engine import Engine
from ..status import LLMException
from .link import Link
from .messages import Invalidate

logger = logging.getLogger(__name__)

# The peer answers once its transfers on the cache are done (serving.py waits up to 4 s).
INVALIDATE_TIMEOUT_S = 5.0


class Invalidator:
    """One thread per engine sends the notices, so the table lock is never held over a call."""

    def __init__(self, engine: Engine, links: Callable[[], List[Link]]):
        self._engine = engine
        self._links = links
        self._jobs: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"llm_datadist_torch-notify-{engine.cluster_id}")
        self._thread.start()
        engine.table.on_forget = self._on_forget

    def _on_forget(self, entry) -> None:
        """(Table lock held.) Peers that may have kept an answer about `entry` must drop it
        before its memory can be reused: hold the memory until they were told."""
        links = [link for link in self._links() if entry.cache_id in link.exported]
        if links:
            self._jobs.put((entry.cache_id, links, self._engine.table.hold([entry])))

    def _run(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while not self._jobs.empty():  # what piled up meanwhile goes out in one batch
                jobs.append(self._jobs.get_nowait())
            stop = None in jobs
            jobs = [job for job in jobs if job is not None]
            by_link: Dict[Link, List[int]] = {}
            for cache_id, links, _ in jobs:
                for link in links:
                    by_link.setdefault(link, []).append(cache_id)
            for link, cache_ids in by_link.items():
                self._tell(link, cache_ids)
            for _, _, release in jobs:
                release()
            if stop:
                return

    def _tell(self, link: Link, cache_ids: List[int]) -> None:
        """One notice per peer for every cache of the batch; answered once the peer's
        transfers on them ended (or not at all by a dead peer: the memory goes anyway)."""
        with link.lock:
            link.exported.difference_update(cache_ids)
        if link.rpc is None or link.broken:
            return
        try:
            link.rpc.call(Invalidate(session=link.session, cache_ids=cache_ids),
                          INVALIDATE_TIMEOUT_S)
        except LLMException as exc:
            logger.warning("could not tell cluster %d that caches %s are gone: %s",
                           link.cluster_id, cache_ids, exc)

    def close(self) -> None:
        self._engine.table.on_forget = None
        self._jobs.put(None)
        self._thread.join(timeout=INVALIDATE_TIMEOUT_S + 5)
        while not self._jobs.empty():  # jobs queued after the sentinel: free their memory
            job = self._jobs.get_nowait()
            if job is not None:
                job[2]()
