"""Encode/decode control messages: one msgpack frame ``[PROTOCOL_VERSION, tagged message]``."""
from __future__ import annotations

from typing import List

import msgspec

from ..status import LLMException, LLMStatusCode
from .messages import PROTOCOL_VERSION, MESSAGE_TYPES, AnyMessage, Message

__all__ = ["encode", "decode"]


class _Frame(msgspec.Struct, array_like=True, frozen=True):
    # Trailing elements a later version might append are ignored by msgspec.
    protocol_version: int
    message: AnyMessage  # type: ignore[valid-type]


_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(_Frame)
# Fallback used only when a frame does not decode: is it another version, or garbage?
_probe_decoder = msgspec.msgpack.Decoder(List[msgspec.Raw])
_int_decoder = msgspec.msgpack.Decoder(int)


def encode(msg: Message, *, protocol_version: int = PROTOCOL_VERSION) -> bytes:
    """One frame for `msg`. ``protocol_version`` exists for tests of version mismatch."""
    if not isinstance(msg, MESSAGE_TYPES):
        raise TypeError(f"not a control message type: {type(msg).__name__}")
    return _encoder.encode((protocol_version, msg))


def decode(data) -> Message:
    """The message in one frame (bytes-like).

    Raises LLMException(LLM_LINK_FAILED) for a frame of another protocol version and
    LLMException(LLM_PARAM_INVALID) for anything else that does not decode.
    """
    try:
        frame = _frame_decoder.decode(data)
    except msgspec.DecodeError as exc:
        _check_version(_peek_version(data))
        raise LLMException(f"undecodable control message: {exc}",
                           status_code=LLMStatusCode.LLM_PARAM_INVALID) from None
    _check_version(frame.protocol_version)
    return frame.message


def _peek_version(data):
    try:
        return _int_decoder.decode(_probe_decoder.decode(data)[0])
    except (msgspec.DecodeError, IndexError):
        return None


def _check_version(version) -> None:
    if version is not None and version != PROTOCOL_VERSION:
        raise LLMException(
            f"control protocol version mismatch: peer speaks {version}, "
            f"this side speaks {PROTOCOL_VERSION}",
            status_code=LLMStatusCode.LLM_LINK_FAILED)
