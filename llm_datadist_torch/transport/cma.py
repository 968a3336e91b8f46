"""`cma`: cross-memory attach (`process_vm_readv`/`writev`) into a same-host peer's CPU memory.

Works for any CPU memory the owner registered, not only shm arenas, at the price of ptrace
permission: same uid, and under Yama (`/proc/sys/kernel/yama/ptrace_scope` = 1) the owner must
name the reader, which `grant_access` does. One native call moves all segments of a transfer,
split over two threads when it pays like the shm copies; if it fails midway, other segments may
already be copied.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Dict, List, NoReturn, Optional, Set

from ..memory.native import _C
from ..memory.copy import COPY_THREADS, SegmentRangeError
from ..status import LLMException, LLMStatusCode, fail
from ..core.descriptors import Region
from .base import Peer, Segments, TransferItem, Transport

logger = logging.getLogger(__name__)

_PTRACER_ANY = -1  # PR_SET_PTRACER_ANY
# Opt-in: with several CMA peers, let any process of this user attach (Yama names one ptracer).
ANY_PTRACER_ENV = "LLM_DATADIST_TORCH_CMA_ANY_PTRACER"
_grant_lock = threading.Lock()
_granted: Optional[int] = None
_peers_of: Dict[object, Set[int]] = {}  # engine (its link manager) -> pids it links with


def grant_access(holder: object, peer_pids: Set[int]) -> None:
    """`holder`'s linked same-host peers are now `peer_pids`: let exactly the peers of every
    engine of this process read and write its memory through CMA (Yama: `ptrace_scope` 1).

    Yama names one ptracer per process. With one peer in the whole process, that peer is
    named; with several, the first is kept and the others cannot attach (their transfers fail
    with LLM_FEATURE_NOT_ENABLED and go through the owner's staging area instead), unless
    `LLM_DATADIST_TORCH_CMA_ANY_PTRACER=1` opens CMA to any process of this user. Harmless
    without Yama. Call whenever a holder's set of peers changes (an empty set when it closes).
    """
    global _granted
    with _grant_lock:
        if peer_pids:
            _peers_of[holder] = set(peer_pids)
        else:
            _peers_of.pop(holder, None)
        pids = set().union(*_peers_of.values())
        if not pids:
            target = 0
        elif len(pids) == 1:
            target = next(iter(pids))
        elif os.environ.get(ANY_PTRACER_ENV) == "1":
            target = _PTRACER_ANY
        else:
            target = _granted if _granted in pids else min(pids)
        if len(pids) > 1 and target != _PTRACER_ANY:
            logger.info("%d CMA peers (pids %s): Yama names one ptracer, pid %d; the others go "
                        "through staging where Yama applies", len(pids), sorted(pids), target)
        if target == _granted:
            return
        if target == _PTRACER_ANY:
            logger.warning("CMA is open to any process of this user (%s=1); peers: %s",
                           ANY_PTRACER_ENV, sorted(pids))
        try:
            _C.allow_ptrace_from(target)
        except OSError as exc:
            fail(LLMStatusCode.LLM_FAILED, "prctl(PR_SET_PTRACER, %d) failed: %s", target, exc)
        _granted = target


class CmaTransport(Transport):
    """Copies between local CPU tensors and a same-host peer's CPU memory by address."""

    name = "cma"

    @classmethod
    def can_serve(cls, peer: Peer, region: Region) -> bool:
        return peer.same_host and not peer.same_process and region.device == "cpu"

    def _transfer(self, items: List[TransferItem], segments: Segments, to_remote: bool) -> None:
        for item in items:
            if item.local.device.type != "cpu" and item.lengths.numel():
                fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "cma moves CPU memory only; local "
                     "tensor is on %s (%s)", item.local.device, self.describe(item.region))
        # The peer's regions as it described them: every segment is checked against them (and
        # the local tensors) natively before any byte moves; the kernel then refuses whatever
        # is not really mapped there (EFAULT). Sorted by remote address natively.
        remote = segments.remote_regions([item.region.address for item in items])
        call = _C.cma_write if to_remote else _C.cma_read
        try:
            call(self.peer.pid, segments.local_regions(), segments.index, segments.local_offsets,
                 remote, segments.index, segments.remote_offsets, segments.lengths, COPY_THREADS)
        except SegmentRangeError as exc:
            segments.refuse(exc)
        except OSError as exc:
            self.raise_os_error(exc, "%s of %d item(s), first %s" % (
                "write" if to_remote else "read", len(items), self.describe(items[0].region)))

    def native_bases(self, regions):
        return self.peer.pid, [region.address for region in regions]

    def raise_os_error(self, exc: OSError, what: str) -> NoReturn:
        """A failed `process_vm_readv`/`writev` of `what` as the `LLMException` it means."""
        if exc.errno == errno.ESRCH:
            fail(LLMStatusCode.LLM_LINK_FAILED, "cma %s: peer process %d is gone (%s)",
                 what, self.peer.pid, exc)
        if exc.errno == errno.EFAULT:
            fail(LLMStatusCode.LLM_PARAM_INVALID, "cma %s: an address is not mapped in peer %d "
                 "or here (%s)", what, self.peer.pid, exc)
        if exc.errno == errno.EPERM:
            refused = LLMException(
                "cma %s: not permitted to access peer %d (%s); check "
                "/proc/sys/kernel/yama/ptrace_scope and that both run as one user"
                % (what, self.peer.pid, exc), status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
            refused.ptrace_refused = True  # the caller may go through the owner's staging area
            raise refused
        fail(LLMStatusCode.LLM_FAILED, "cma %s failed: %s", what, exc)
