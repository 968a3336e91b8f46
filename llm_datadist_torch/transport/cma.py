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
import threading
from typing import List, Optional, Set

from ..memory.native import _C
from ..memory.copy import COPY_THREADS, SegmentRangeError
from ..status import LLMStatusCode, fail
from ..core.descriptors import Region
from .base import Peer, Segments, TransferItem, Transport

logger = logging.getLogger(__name__)

_PTRACER_ANY = -1  # PR_SET_PTRACER_ANY
_grant_lock = threading.Lock()
_granted: Optional[int] = None


def grant_access(peer_pids: Set[int]) -> None:
    """Let exactly the linked peers read and write this process's memory through CMA.

    Yama accepts one ptracer per process, so several peers need "any process of this uid".
    Harmless without Yama. Call whenever the set of linked peers changes.
    """
    global _granted
    if not peer_pids:
        target = 0
    elif len(peer_pids) == 1:
        target = next(iter(peer_pids))
    else:
        target = _PTRACER_ANY
    with _grant_lock:
        if target == _granted:
            return
        if target == _PTRACER_ANY:
            logger.info("%d linked peers (pids %s): Yama allows one named ptracer, so CMA access "
                        "is opened to any process of this user", len(peer_pids),
                        sorted(peer_pids))
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
            self._raise(exc, items, to_remote)

    def _raise(self, exc: OSError, items: List[TransferItem], to_remote: bool) -> None:
        what = "%s of %d item(s), first %s" % ("write" if to_remote else "read", len(items),
                                               self.describe(items[0].region))
        if exc.errno == errno.ESRCH:
            fail(LLMStatusCode.LLM_LINK_FAILED, "cma %s: peer process %d is gone (%s)",
                 what, self.peer.pid, exc)
        if exc.errno == errno.EFAULT:
            fail(LLMStatusCode.LLM_PARAM_INVALID, "cma %s: an address is not mapped in peer %d "
                 "or here (%s)", what, self.peer.pid, exc)
        if exc.errno == errno.EPERM:
            fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "cma %s: not permitted to access peer %d "
                 "(%s); check /proc/sys/kernel/yama/ptrace_scope and that both run as one user",
                 what, self.peer.pid, exc)
        fail(LLMStatusCode.LLM_FAILED, "cma %s failed: %s", what, exc)
