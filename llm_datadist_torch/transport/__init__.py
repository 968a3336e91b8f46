"""The data plane: transports that move cache bytes between processes (see base.py)."""
from __future__ import annotations

from typing import Dict, Optional, Type

from ..status import LLMStatusCode, fail
from ..core.descriptors import Region
from .base import Peer, TransferItem, Transport
from .cma import CmaTransport, grant_access
from .local import LocalTransport
from .mooncake.transport import MooncakeTransport
from .shm import ShmTransport

# Automatic choice tries these in order; adding a backend is one entry here.
TRANSPORTS: Dict[str, Type[Transport]] = {
    "local": LocalTransport,
    "shm": ShmTransport,
    "cma": CmaTransport,
    "mooncake": MooncakeTransport,  # cross host; needs agents on both ends
}
AUTOMATIC = (None, "", "auto", "hixl")  # upstream's "hixl" means "pick one" here


def choose_transport(peer: Peer, region: Region, forced: Optional[str] = None
                     ) -> Type[Transport]:
    """The transport class for `region` of `peer`: `forced` if given, else the first able one.

    `LLMException(LLM_FEATURE_NOT_ENABLED)` if the forced (or every) transport cannot serve it.
    """
    where = "peer pid %d (same process: %s, same host: %s), %s region%s" % (
        peer.pid, peer.same_process, peer.same_host, region.device,
        " in /dev/shm/" + region.shm_name if region.shm_name else " outside shared memory")
    if forced not in AUTOMATIC:
        cls = TRANSPORTS.get(forced)
        if cls is None:
            fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "transfer backend %r is not available "
                 "(known: %s)", forced, ", ".join(TRANSPORTS))
        if not cls.can_serve(peer, region):
            fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "transfer backend %r cannot serve %s",
                 forced, where)
        return cls
    for cls in TRANSPORTS.values():
        if cls.can_serve(peer, region):
            return cls
    fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "no transport can serve %s (tried %s)", where,
         ", ".join(TRANSPORTS))


__all__ = ["TRANSPORTS", "choose_transport", "grant_access", "Peer",
           "TransferItem", "Transport", "LocalTransport", "ShmTransport", "CmaTransport",
           "MooncakeTransport"]
