"""Status codes, the library exception and the `Status` value (spec §4.1, §5)."""
from __future__ import annotations

import enum
import logging
from typing import NoReturn

logger = logging.getLogger(__name__)

_LLM_BASE = 0x5010B000


class LLMStatusCode(enum.IntEnum):
    """Upstream status codes; values are the engine's numbers (GE encoding)."""

    LLM_SUCCESS = 0x0
    LLM_FAILED = 0xFFFFFFFF
    LLM_PARAM_INVALID = _LLM_BASE + 0x05
    LLM_WAIT_PROCESS_TIMEOUT = _LLM_BASE + 0x01
    LLM_KV_CACHE_NOT_EXIST = _LLM_BASE + 0x02
    LLM_REPEAT_REQUEST = _LLM_BASE + 0x03
    LLM_REQUEST_ALREADY_COMPLETED = _LLM_BASE + 0x04
    LLM_ENGINE_FINALIZED = _LLM_BASE + 0x06
    LLM_NOT_YET_LINK = _LLM_BASE + 0x07
    LLM_ALREADY_LINK = _LLM_BASE + 0x08
    LLM_LINK_FAILED = _LLM_BASE + 0x09
    LLM_UNLINK_FAILED = _LLM_BASE + 0x0A
    LLM_NOTIFY_PROMPT_UNLINK_FAILED = _LLM_BASE + 0x0B
    LLM_CLUSTER_NUM_EXCEED_LIMIT = _LLM_BASE + 0x0C
    LLM_PROCESSING_LINK = _LLM_BASE + 0x0D
    LLM_DEVICE_OUT_OF_MEMORY = _LLM_BASE + 0x0E
    LLM_PREFIX_ALREADY_EXIST = _LLM_BASE + 0x0F
    LLM_PREFIX_NOT_EXIST = _LLM_BASE + 0x10
    LLM_SEQ_LENOVERLIMIT = _LLM_BASE + 0x11
    LLM_NO_FREE_BLOCK = _LLM_BASE + 0x12
    LLM_BLOCKS_OUT_OF_MEMORY = _LLM_BASE + 0x13
    LLM_EXIST_LINK = _LLM_BASE + 0x18
    LLM_FEATURE_NOT_ENABLED = _LLM_BASE + 0x19
    LLM_TIMEOUT = _LLM_BASE + 0x1A
    LLM_LINK_BUSY = _LLM_BASE + 0x1B
    LLM_OUT_OF_MEMORY = _LLM_BASE + 0x1C
    # ACL runtime codes (CANN rt_error_codes.h); never produced by this library.
    LLM_DEVICE_MEM_ERROR = 507053
    LLM_SUSPECT_REMOTE_ERROR = 507057
    LLM_UNKNOWN_ERROR = -1

    def __str__(self) -> str:
        return f"LLMStatusCode.{self.name}"


class LLMException(RuntimeError):
    """The library's error: a `RuntimeError` that carries an `LLMStatusCode`.

    Upstream quirk kept on purpose: a bare ``LLMException("msg")`` reports ``LLM_SUCCESS``.
    Everything this library raises sets an explicit code.
    """

    def __init__(self, *args, status_code: LLMStatusCode = LLMStatusCode.LLM_SUCCESS):
        super().__init__(*args)
        self._status_code = status_code

    @property
    def status_code(self) -> LLMStatusCode:
        return self._status_code


class Status:
    """A status code holder, exported for compatibility (no v2 API returns it)."""

    def __init__(self, status):
        self._status = status

    def is_ok(self) -> bool:
        return self._status == LLMStatusCode.LLM_SUCCESS

    @property
    def status_code(self):
        return self._status


_KNOWN_CODES = {int(code) for code in LLMStatusCode if code is not LLMStatusCode.LLM_UNKNOWN_ERROR}


def code_2_status(raw: int) -> LLMStatusCode:
    """Map a raw engine code to its `LLMStatusCode`; unknown codes become `LLM_FAILED`."""
    if raw in _KNOWN_CODES:
        return LLMStatusCode(raw)
    return LLMStatusCode.LLM_FAILED


def raise_if_false(condition, message: str, *args,
                   status_code: LLMStatusCode = LLMStatusCode.LLM_PARAM_INVALID) -> None:
    """Raise `LLMException(status_code)` with ``message % args`` unless `condition` holds.

    The failure is logged at ERROR first, as upstream does.
    """
    if condition:
        return
    text = message % args if args else message
    logger.error("%s", text)
    raise LLMException(text, status_code=status_code)


def fail(status_code: LLMStatusCode, message: str, *args) -> NoReturn:
    """Log and raise `LLMException(status_code)` unconditionally."""
    raise_if_false(False, message, *args, status_code=status_code)
