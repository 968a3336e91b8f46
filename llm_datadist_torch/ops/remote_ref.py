"""What names a remote cache in a pull or push: a key of one of three kinds (spec §14.5)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..keys import INVALID_ID


@dataclasses.dataclass
class RemoteRef:
    """What names the remote cache: a key of one of three kinds (spec §14.5)."""

    kind: str  # "cache_key" | "id_index" | "blocks"
    req_id: int = INVALID_ID
    prefix_id: int = INVALID_ID
    model_id: int = 0
    cache_id: int = -1
    batch_index: int = 0

    @property
    def reusable_key(self) -> Optional[tuple]:
        """Key under which the owner's answer may be kept: blocks keys and cache ids name the
        same memory until the owner says otherwise; request keys are consumed by pulls."""
        if self.kind == "cache_key":
            return None
        return (self.kind, self.model_id if self.kind == "blocks" else self.cache_id)
