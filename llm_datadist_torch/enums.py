"""Small enumerations of the public API (spec §4.2, §4.3, §4.5, §4.6, §4.7)."""
from __future__ import annotations

from enum import Enum, IntEnum


class LLMRole(IntEnum):
    """Role of an `LLMDataDist`; numbers match the C++ `LlmRole`."""

    PROMPT = 1
    DECODER = 2
    MIX = 3

    def __str__(self) -> str:
        return f"LLMRole.{self.name}"


class Placement(IntEnum):
    """Where a cache lives; the value is passed unchanged to the engine (`CachePlacement`)."""

    HOST = 0
    DEVICE = 1

    def __str__(self) -> str:
        return f"Placement.{self.name}"


class RegisterMemStatus(Enum):
    OK = 0
    PREPARING = 1
    FAILED = 2


class Memtype(Enum):
    MEM_TYPE_DEVICE = 0
    MEM_TYPE_HOST = 1


class PushType(Enum):
    """Internal: how a push/transfer names its destination (not exported)."""

    NO_CACHE_KEY = 0
    BLOCKS_CACHE_KEY = 1
    CACHE_KEY_BY_ID = 2


_ROLE_STRINGS = {LLMRole.PROMPT: "Prompt", LLMRole.DECODER: "Decoder", LLMRole.MIX: "Mix"}


def role_to_engine_string(role: LLMRole) -> str:
    """The `llm.Role` option value of `role` ("Prompt" / "Decoder" / "Mix")."""
    return _ROLE_STRINGS[LLMRole(role)]


def register_mem_status_from_int(value: int) -> RegisterMemStatus:
    """Engine status number -> `RegisterMemStatus`; anything unknown reads as `FAILED`."""
    for status in RegisterMemStatus:
        if status.value == value:
            return status
    return RegisterMemStatus.FAILED
