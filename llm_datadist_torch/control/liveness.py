"""Links whose peer is gone are dropped: at once for a peer on this host whose process died,
after a failed probe for an idle peer elsewhere; so what they hold (staging areas, sockets,
slots under the link cap) comes back within seconds, not at `finalize`."""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..status import LLMException
from .identity import start_time
from .link import Link
from .messages import Ping

if TYPE_CHECKING:
    from .links import LinkManager

logger = logging.getLogger(__name__)

REAP_INTERVAL_S = 1.0
IDLE_S = 30.0  # an idle peer elsewhere is probed after this long without a request either way
PROBE_TIMEOUT_S = 2.0


def process_gone(link: Link) -> bool:
    """A peer proven on this host whose process died (or whose pid is another process now)."""
    peer = link.peer
    return peer.same_host and not peer.same_process and start_time(peer.pid) != link.start_time


def holds_link(link: Link, timeout_s: float) -> bool:
    """Whether the peer answers for this link (a peer that restarted, unlinked on its side or
    never gave a way to reach it does not)."""
    if link.broken or link.rpc is None:
        return False
    try:
        link.rpc.call(Ping(session=link.session), timeout_s)
    except LLMException:
        return False
    return True


class Reaper:
    """One thread per engine looks at its links every `REAP_INTERVAL_S`."""

    def __init__(self, links: "LinkManager", name: str):
        self._links = links
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(REAP_INTERVAL_S):
            now = time.monotonic()
            for link in self._links.all_links():
                if self._stop.is_set():
                    return
                # A one-way link (no callback endpoint) cannot be probed: it is only ever
                # evicted to make room under the link cap (links.py).
                if process_gone(link) or (
                        now - link.last_used > IDLE_S and link.rpc is not None
                        and not link.peer.same_process and not holds_link(link, PROBE_TIMEOUT_S)):
                    logger.info("dropping the link with cluster %d: its peer is gone",
                                link.cluster_id)
                    self._links.drop_link(link)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=PROBE_TIMEOUT_S + 5)
