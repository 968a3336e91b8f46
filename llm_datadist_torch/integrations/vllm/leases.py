"""The prefill side's leases on finished requests' KV blocks.

A request that finished prefill for a remote decoder keeps its blocks (vLLM's delay_free)
under a lease: `lease_s` seconds, renewed by the decoder while it waits to pull. The blocks go
back to vLLM when every decoder rank released them (`Release`, after its pull) or when the lease
ran out (the decoder died, lost the request, or never came). A release after expiry is answered
"not intact": the decoder then treats what it read as a failed load (the blocks may have been
reused while it read), so a decoder never keeps bytes of blocks it did not hold a lease on.

Thread-safe: the side-channel thread releases and renews, the scheduler thread opens leases and
collects the requests whose blocks may be freed (`take_freeable`).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Set

from .config import LOGGER_PREFIX

logger = logging.getLogger(LOGGER_PREFIX + __name__)

ALL_RANKS = -1


@dataclass
class Lease:
    token: str
    expires: float
    released_ranks: Set[int] = field(default_factory=set)


class LeaseTable:
    def __init__(self, lease_s: float, tp_size: int, clock: Callable[[], float] = time.monotonic):
        self.lease_s = lease_s
        self.tp_size = tp_size
        self._clock = clock
        self._cond = threading.Condition()
        self._leases: Dict[str, Lease] = {}
        self._freeable: Set[str] = set()
        self.counters = {"opened": 0, "released": 0, "expired": 0, "late": 0}

    def open(self, request_id: str) -> str:
        """Hold `request_id`'s blocks from now on; returns the token decoders must present."""
        token = secrets.token_hex(8)
        with self._cond:
            self._leases[request_id] = Lease(token, self._clock() + self.lease_s)
            self.counters["opened"] += 1
        return token

    def renew(self, leases: Dict[str, str]) -> List[str]:
        """Extend the leases named (request id -> token); returns the ids not held (any more)."""
        unknown = []
        with self._cond:
            expires = self._clock() + self.lease_s
            for request_id, token in leases.items():
                lease = self._leases.get(request_id)
                if lease is None or not secrets.compare_digest(lease.token, token):
                    unknown.append(request_id)
                else:
                    lease.expires = max(lease.expires, expires)
        return unknown

    def release(self, request_id: str, token: str, rank: int) -> bool:
        """Decoder rank `rank` (ALL_RANKS: every rank) is done; True if the lease was intact."""
        with self._cond:
            self._expire_locked()
            lease = self._leases.get(request_id)
            if lease is None or not secrets.compare_digest(lease.token, token):
                self.counters["late"] += 1
                return False
            if rank == ALL_RANKS:
                lease.released_ranks.update(range(self.tp_size))
            elif 0 <= rank < self.tp_size:
                lease.released_ranks.add(rank)
            else:
                return False
            if len(lease.released_ranks) >= self.tp_size:
                del self._leases[request_id]
                self._freeable.add(request_id)
                self.counters["released"] += 1
                self._cond.notify_all()
            return True

    def _expire_locked(self) -> None:
        now = self._clock()
        expired = [rid for rid, lease in self._leases.items() if lease.expires <= now]
        for request_id in expired:
            del self._leases[request_id]
            self._freeable.add(request_id)
            self.counters["expired"] += 1
            logger.warning("LLMDataDistConnector: the lease on request %s's KV blocks expired "
                           "(no decoder released or renewed it within %.0f s): freeing them",
                           request_id, self.lease_s)
        if expired:
            self._cond.notify_all()

    def take_freeable(self, wait_s: float = 0.0) -> Set[str]:
        """Requests whose blocks may be freed now (each returned once). With `wait_s`, waits up
        to that long for one while leases are open (an idle engine's step, instead of a spin)."""
        with self._cond:
            self._expire_locked()
            if not self._freeable and self._leases and wait_s > 0:
                self._cond.wait(wait_s)
                self._expire_locked()
            freeable, self._freeable = self._freeable, set()
            return freeable

    def status(self) -> Dict[str, int]:
        with self._cond:
            self._expire_locked()
            return dict(self.counters, open=len(self._leases))

    @property
    def open_count(self) -> int:
        with self._cond:
            return len(self._leases)
