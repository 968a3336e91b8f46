"""Fault injection: make the control plane or the data plane fail on purpose, on CPU, so an
engine's handling of lost messages, slow peers and failed copies can be tested without a
broken network. Killing or stopping a peer needs no help: send it SIGKILL or SIGSTOP.

Faults are armed per process, from code or from the environment (read at import)::

    from llm_datadist_torch import faults
    faults.arm("rpc.drop", "Resolve", count=1)       # the next Resolve request is lost
    faults.arm("copy.stall", "cma", seconds=0.5)     # every cma copy starts 0.5 s late
    faults.clear()

    LLM_DATADIST_TORCH_FAULTS="rpc.drop:Resolve:1,copy.fail:shm"

| point | selector | effect |
|---|---|---|
| `rpc.drop` | a message type (`Resolve`, `StageRead`, ...) or `*` | the request is never sent: the call times out, as for a lost message |
| `rpc.delay` | a message type or `*` | the request goes out `seconds` late |
| `copy.fail` | a transport (`local`, `shm`, `cma`, `mooncake`) or `*` | the copy fails with `LLM_FAILED` before a byte moves |
| `copy.stall` | a transport or `*` | the copy starts `seconds` late |

`count` limits how many times a fault fires (default: every time, until `clear`). In the
environment, the third field is the count for `drop`/`fail` and the seconds for `delay`/`stall`.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import List, Optional

from .status import LLMStatusCode, fail

ENV = "LLM_DATADIST_TORCH_FAULTS"
POINTS = ("rpc.drop", "rpc.delay", "copy.fail", "copy.stall")
_TIMED = ("rpc.delay", "copy.stall")


@dataclasses.dataclass
class _Fault:
    point: str
    selector: str
    seconds: float = 0.0
    count: Optional[int] = None  # fires left; None: until cleared


_faults: List[_Fault] = []
_lock = threading.Lock()


def arm(point: str, selector: str = "*", *, seconds: float = 0.0,
        count: Optional[int] = None) -> None:
    """Arm a fault at `point` for `selector` (see the table above)."""
    if point not in POINTS:
        raise ValueError(f"fault point must be one of {POINTS}, got {point!r}")
    if point in _TIMED and not seconds > 0:
        raise ValueError(f"{point} needs seconds > 0")
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    with _lock:
        _faults.append(_Fault(point, selector, seconds, count))


def clear() -> None:
    """Disarm every fault."""
    with _lock:
        _faults.clear()


def _take(point: str, selector: str) -> Optional[_Fault]:
    if not _faults:  # the usual case: nothing armed, no lock
        return None
    with _lock:
        for fault in _faults:
            if fault.point == point and fault.selector in ("*", selector):
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count == 0:
                        _faults.remove(fault)
                return fault
    return None


def before_request(message_type: str) -> bool:
    """(Control plane.) Delay the request if armed; False if it must be dropped."""
    if _take("rpc.drop", message_type) is not None:
        return False
    delay = _take("rpc.delay", message_type)
    if delay is not None:
        time.sleep(delay.seconds)
    return True


def before_copy(transport: str) -> None:
    """(Data plane.) Stall or fail the copy if armed."""
    if not _faults:  # the usual case: one check per copy
        return
    stall = _take("copy.stall", transport)
    if stall is not None:
        time.sleep(stall.seconds)
    if _take("copy.fail", transport) is not None:
        fail(LLMStatusCode.LLM_FAILED, "%s copy failed: fault injected (%s)", transport, ENV)


def _arm_from_environment(text: str) -> None:
    for rule in filter(None, (part.strip() for part in text.split(","))):
        fields = rule.split(":")
        if len(fields) not in (2, 3):
            raise ValueError(f"{ENV}: {rule!r} is not point:selector[:value]")
        point, selector = fields[0], fields[1]
        value = fields[2] if len(fields) == 3 else None
        if point in _TIMED:
            arm(point, selector, seconds=float(value or 0))
        else:
            arm(point, selector, count=int(value) if value else None)


_arm_from_environment(os.environ.get(ENV, ""))
