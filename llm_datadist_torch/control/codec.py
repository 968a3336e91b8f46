"""Encode/decode control messages: one msgpack frame ``[PROTOCOL_VERSION, tagged message]``."""
from __future__ import annotations

import re

import msgspec

from ..status import LLMException, LLMStatusCode
from .messages import PROTOCOL_VERSION, MESSAGE_TYPES, AnyMessage, Hello, Message, StageRead

__all__ = ["encode", "decode"]


class _Frame(msgspec.Struct, array_like=True, frozen=True):
    # Trailing elements a later version might append are ignored by msgspec.
    protocol_version: int
    message: AnyMessage  # type: ignore[valid-type]


class _VersionProbe(msgspec.Struct, array_like=True, frozen=True):
    # Element 0 only: the rest of the array is skipped, never built (a frame of millions of
    # tiny elements must not cost tens of bytes of memory per byte received).
    protocol_version: msgspec.Raw


_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(_Frame)
# Fallback used only when a frame does not decode: is it another version, or garbage?
_probe_decoder = msgspec.msgpack.Decoder(_VersionProbe)
_int_decoder = msgspec.msgpack.Decoder(int)

_MAX_INT64 = 2**63 - 1
# What a server of ours reports as its endpoint (zmq's LAST_ENDPOINT of a tcp bind): a handshake
# naming anything else (another transport, a host name, garbage zmq refuses) is refused before
# the server acts on it.
_REPLY_ENDPOINT = re.compile(r"tcp://(\d{1,3}(\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+(%[\w.-]+)?\]):\d{1,5}")


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
    _check_limits(frame.message)
    return frame.message


def _check_limits(message: Message) -> None:
    """The decode-time limits a field's type cannot state (messages.py states the others)."""
    if isinstance(message, StageRead):  # and StageWrite
        # The owner adds offsets to lengths and sums the lengths in int64 (owner.py,
        # memory/copy.py): a sum past 2**63 would wrap and pass its bounds checks.
        lengths = message.lengths
        if lengths and (max(message.offsets, default=0) + max(lengths) > _MAX_INT64
                        or sum(lengths) > _MAX_INT64):
            raise LLMException("undecodable control message: staged segments past 2**63 bytes",
                               status_code=LLMStatusCode.LLM_PARAM_INVALID)
    elif isinstance(message, Hello) and message.reply_endpoint \
            and not _REPLY_ENDPOINT.fullmatch(message.reply_endpoint):
        raise LLMException("undecodable control message: reply_endpoint is not tcp://<ip>:<port>",
                           status_code=LLMStatusCode.LLM_PARAM_INVALID)


def _peek_version(data):
    try:
        return _int_decoder.decode(_probe_decoder.decode(data).protocol_version)
    except msgspec.DecodeError:
        return None


def _check_version(version) -> None:
    if version is not None and version != PROTOCOL_VERSION:
        raise LLMException(
            f"control protocol version mismatch: peer speaks {version}, "
            f"this side speaks {PROTOCOL_VERSION}",
            status_code=LLMStatusCode.LLM_LINK_FAILED)
