"""Optional authentication of links with a shared key (HMAC-SHA256 over both challenges).

Without a key, links are open, as upstream: any peer that reaches the listen port may link
(sessions still bind every request to its link). With a key (`LLM_DATADIST_TORCH_AUTH_KEY`, or
the `llm_datadist_torch.AuthKey` option: core/options.py), each side proves it holds the key for this one
handshake: the server answers the client's fresh challenge, the client the server's, each MAC
bound to its direction. A peer without the key gets `LLM_LINK_FAILED` and nothing else is
served to it.
"""
from __future__ import annotations

import hashlib
import hmac

SERVER = b"llmdd-auth-server:"
CLIENT = b"llmdd-auth-client:"


def mac(key: bytes, direction: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key, direction + first + second, hashlib.sha256).digest()


def valid(key: bytes, given: bytes, direction: bytes, first: bytes, second: bytes) -> bool:
    return hmac.compare_digest(given, mac(key, direction, first, second))
