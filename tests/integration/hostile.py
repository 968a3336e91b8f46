"""A hostile or broken control-plane peer, and the live owner it attacks.

* `RawPeer`: one raw zmq DEALER connection to a control server that sends whatever bytes it is
  given as ``[request_id, frame]`` (or any other multipart shape) and classifies what came back.
* `frame` / `junk_array`: wire frames built by hand (msgpack dicts, not the library's Structs),
  so that fields may be missing, of the wrong type, out of range or of another version.
* `message_strategy`: hypothesis strategies for every message type, built from the msgspec types
  of messages.py (their decode-time limits included), mostly valid and sometimes just past a
  limit or of the wrong type.
* `Node`: the spawned child under attack (or the legitimate peer), an `agents.Agent` with a few
  more handlers that look inside (links, sessions, RSS, fds, a canary buffer).
"""
from __future__ import annotations

import itertools
import os
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import msgspec
import msgspec.inspect as mi
import torch
import zmq
from hypothesis import strategies as st

from agents import Agent, tensor_pattern
from harness import serve
from helpers import shm_files
from llm_datadist_torch.control import codec
from llm_datadist_torch.control.messages import (MESSAGE_TYPES, PROTOCOL_VERSION, ErrorReply,
                                                  HelloReply, Message)

REPLY_TIMEOUT_S = 2.0   # a server that answers nothing within this dropped the frame (or hangs)
ALIVE_TIMEOUT_S = 5.0   # a server that cannot answer a Ping within this hangs
MSGPACK_MIN, MSGPACK_MAX = -2**63, 2**64 - 1
_ids = itertools.count(1)


# ---- the raw client ----------------------------------------------------------------------------
_ctx_lock = threading.Lock()
_ctx: Optional[zmq.Context] = None


def context() -> zmq.Context:
    """A zmq context of the attacker's own (not the library's), room for thousands of sockets."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            _ctx = zmq.Context()
            _ctx.set(zmq.MAX_SOCKETS, 8192)
        return _ctx


class RawPeer:
    """One DEALER connection to `endpoint`; counts the bytes it sent."""

    def __init__(self, endpoint: str, routing_id: Optional[bytes] = None):
        self.sock = context().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT_S * 1000))
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)
        self.sent_bytes = 0

    def send_parts(self, parts: Sequence[bytes]) -> None:
        self.sock.send_multipart(list(parts))
        self.sent_bytes += sum(len(p) for p in parts)

    def recv_parts(self, timeout_s: float = REPLY_TIMEOUT_S) -> Optional[List[bytes]]:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return self.sock.recv_multipart()

    def exchange(self, payload: bytes, timeout_s: float = REPLY_TIMEOUT_S) -> Optional[bytes]:
        """Send one request frame; the reply frame, or None if none came (late ones skipped)."""
        request_id = struct.pack("<Q", next(_ids))
        self.send_parts([request_id, payload])
        deadline = time.monotonic() + timeout_s
        while True:
            parts = self.recv_parts(max(deadline - time.monotonic(), 0))
            if parts is None:
                return None
            if len(parts) == 2 and parts[0] == request_id:
                return parts[1]

    def call(self, message, timeout_s: float = REPLY_TIMEOUT_S) -> Optional[Message]:
        """`message` (a Struct, or a frame's bytes) out; the decoded reply, or None."""
        payload = message if isinstance(message, bytes) else codec.encode(message)
        reply = self.exchange(payload, timeout_s)
        return None if reply is None else codec.decode(reply)

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> "RawPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def outcome(reply: Optional[bytes]) -> str:
    """What a server did with a request: "dropped", "error", "refused" (a HelloReply that
    refuses), "garbage reply" (a server bug), or the name of the success reply."""
    if reply is None:
        return "dropped"
    try:
        message = codec.decode(reply)
    except Exception:  # noqa: BLE001 - a reply of ours must always decode
        return "garbage reply"
    if isinstance(message, ErrorReply):
        return "error"
    if isinstance(message, HelloReply) and not message.accepted:
        return "refused"
    return type(message).__name__


def status_of(reply: Optional[bytes]) -> Optional[int]:
    """The status code an ErrorReply or HelloReply carries (None for anything else)."""
    if reply is None:
        return None
    message = codec.decode(reply)
    return getattr(message, "status_code", None)


# ---- frames built by hand ----------------------------------------------------------------------
_raw_encoder = msgspec.msgpack.Encoder()


def frame(tag: str, fields: Dict[str, Any], version: Any = PROTOCOL_VERSION) -> bytes:
    """``[version, {"type": tag, **fields}]`` as msgpack, no check of anything."""
    return _raw_encoder.encode([version, {"type": tag, **fields}])


def junk_array(count: int, item: bytes = b"\xc0") -> bytes:
    """A msgpack array of `count` copies of one encoded item (default nil): a frame that is
    cheap to send and, decoded element by element, expensive to hold."""
    return b"\xdd" + struct.pack(">I", count) + item * count


TAGS = {cls: mi.type_info(cls).tag for cls in MESSAGE_TYPES}


def minimal(t: mi.Type) -> Any:
    """The simplest valid value of msgspec type `t`."""
    if isinstance(t, mi.IntType):
        return t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else 0)
    if isinstance(t, mi.BoolType):
        return False
    if isinstance(t, mi.StrType):
        return ""
    if isinstance(t, mi.BytesType):
        return b""
    if isinstance(t, (mi.ListType, mi.VarTupleType)):
        return []
    if isinstance(t, mi.DictType):
        return {}
    if isinstance(t, mi.UnionType):
        return minimal(t.types[0])
    if isinstance(t, mi.StructType):
        values = {f.encode_name: minimal(f.type) for f in t.fields if f.required}
        return list(values.values()) if t.array_like else values
    return None


def frame_for(cls, version: Any = PROTOCOL_VERSION, **given) -> bytes:
    """A frame of message type `cls` with the fields `given` and the simplest valid value in
    every other required field (so it follows the current schema, whatever fields it has)."""
    info = mi.type_info(cls)
    fields = {f.encode_name: minimal(f.type) for f in info.fields if f.required}
    fields.update(given)
    return frame(info.tag, fields, version)


# ---- hypothesis strategies from the msgspec types ----------------------------------------------
EDGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -2**63]
WRONG_TYPES = st.sampled_from([None, "s", b"b", 1.5, [], {}, [1, "x"], {"a": 1}, True, -1])
LIST_EXAMPLE_MAX = 6


def _int_strategy(t: mi.IntType, valid: bool) -> st.SearchStrategy:
    low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else MSGPACK_MIN)
    high = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else MSGPACK_MAX)
    edges = [v for v in EDGE_INTS + [low - 1, low, high, high + 1]
             if MSGPACK_MIN <= v <= MSGPACK_MAX and (not valid or low <= v <= high)]
    small = st.integers(max(low, -1000), min(high, 1 << 20)) \
        if max(low, -1000) <= min(high, 1 << 20) else st.integers(low, high)
    return st.one_of(small, st.integers(low, high), st.sampled_from(edges))


WORDS = ["", "pull", "push", "b2b", "c2c", "c2b", "blocks", "cache_key", "id_index", "cpu", "cuda"]


def value_strategy(t: mi.Type, valid: bool = False) -> st.SearchStrategy:
    """Values for a field of msgspec type `t`: within its limits if `valid`, else mostly within
    and sometimes just past them."""
    if isinstance(t, mi.IntType):
        return _int_strategy(t, valid)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.StrType):
        limit = t.max_length if t.max_length is not None else 300
        options = [st.text(max_size=min(limit, 16)), st.sampled_from(WORDS)]
        return st.one_of(options if valid else options + [st.just("x" * (limit + 1))])
    if isinstance(t, mi.BytesType):
        limit = t.max_length if t.max_length is not None else 300
        options = [st.binary(max_size=min(limit, 32))]
        return st.one_of(options if valid else
                         options + [st.binary(min_size=limit + 1, max_size=limit + 1)])
    if isinstance(t, (mi.ListType, mi.VarTupleType)):
        size = LIST_EXAMPLE_MAX if t.max_length is None else min(LIST_EXAMPLE_MAX, t.max_length)
        return st.lists(value_strategy(t.item_type, valid), max_size=size)
    if isinstance(t, mi.TupleType):
        return st.tuples(*[value_strategy(item, valid) for item in t.item_types]).map(list)
    if isinstance(t, mi.DictType):
        return st.dictionaries(value_strategy(t.key_type, valid),
                               value_strategy(t.value_type, valid), max_size=3)
    if isinstance(t, mi.UnionType):
        return st.one_of([value_strategy(item, valid) for item in t.types])
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.StructType):
        fields = {f.encode_name: value_strategy(f.type, valid) for f in t.fields}
        if t.array_like:
            return st.tuples(*fields.values()).map(list)
        return st.fixed_dictionaries(fields)
    return WRONG_TYPES


def message_strategy(cls, overrides: Optional[Dict[str, st.SearchStrategy]] = None
                     ) -> st.SearchStrategy:
    """Frames of message type `cls` (bytes). About half of them well-formed (every field from
    `overrides`, field -> strategy, or else within its msgspec limits), so they reach the
    handlers; the others mangled: values just past a limit, wrong types, fields left out,
    unknown fields added, another protocol version."""
    info = mi.type_info(cls)
    overrides = overrides or {}
    valid, mangled = {}, {}
    for f in info.fields:
        mine = [overrides[f.encode_name]] if f.encode_name in overrides else []
        valid[f.encode_name] = mine[0] if mine else value_strategy(f.type, valid=True)
        mangled[f.encode_name] = st.one_of(mine + [value_strategy(f.type), WRONG_TYPES])
    well_formed = st.fixed_dictionaries(valid).map(lambda body: frame(info.tag, body))
    complete = st.fixed_dictionaries(mangled)
    partial = st.fixed_dictionaries({}, optional=mangled)
    extra = st.fixed_dictionaries(mangled, optional={"zz_unknown": WRONG_TYPES})
    version = st.one_of([st.just(PROTOCOL_VERSION)] * 8 + [st.sampled_from([
        PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, -1, 2**64 - 1, str(PROTOCOL_VERSION), None])])
    broken = st.builds(lambda body, v: frame(info.tag, body, v),
                       st.one_of(complete, complete, partial, extra), version)
    return st.one_of(well_formed, broken)


# ---- the child under attack --------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Node(Agent):
    """An `Agent` that also answers what a hostile-peer test needs to see inside."""

    canary: Optional[torch.Tensor] = None
    canary_seed = 0

    def fill(self, name: str, seed: int) -> None:
        self.__dict__.setdefault("seeds", {})[name] = seed
        super().fill(name, seed)

    def changed_bytes(self, name: str) -> int:
        """Bytes of cache `name` that differ from what its last `fill` wrote."""
        seed = self.__dict__["seeds"][name]
        changed = 0
        for index, tensor in enumerate(self._tensors(name)):
            raw = tensor.reshape(-1).view(torch.uint8)
            changed += int((raw != tensor_pattern(seed, index, raw.numel())).sum())
        return changed

    def stage_fields(self, name: str) -> dict:
        """What a linked peer learns from `Resolve` and must repeat in a StageRead / StageWrite
        of cache `name` besides its id (the cache's fence value, where caches have fences)."""
        entry = self.manager._engine.table.lookup_by_id(self.caches[name].cache_id)  # noqa: SLF001
        fence = getattr(entry, "fence", None)
        return {"fence": fence[1]} if fence is not None else {}

    def plant_canary(self, nbytes: int, seed: int) -> int:
        """A buffer of this process that no link is ever given; its address."""
        self.canary_seed = seed
        self.canary = tensor_pattern(seed, 0, nbytes).clone()
        return self.canary.data_ptr()

    def canary_changed(self) -> int:
        """Bytes of the canary buffer that differ from what was planted."""
        want = tensor_pattern(self.canary_seed, 0, self.canary.numel())
        return int((self.canary != want).sum())

    def host_id(self) -> str:
        return self.dd._links._host_id  # noqa: SLF001 - tests may look inside

    def peer(self, cluster_id: int) -> Optional[dict]:
        """What the link with `cluster_id` believes about its peer, or None if unlinked."""
        links = self.dd._links  # noqa: SLF001
        with links._lock:  # noqa: SLF001
            link = links._links.get(cluster_id)  # noqa: SLF001
        if link is None:
            return None
        return {"pid": link.peer.pid, "same_host": link.peer.same_host,
                "same_process": link.peer.same_process, "broken": link.broken,
                "reply_endpoint": link.rpc.endpoint if link.rpc is not None else None}

    def session(self, cluster_id: int) -> bytes:
        """The token this side puts in its requests to `cluster_id` (the peer issued it)."""
        return self.dd._links.get(cluster_id).session  # noqa: SLF001

    def link_ids(self) -> List[int]:
        return self.dd._links.linked_ids()  # noqa: SLF001

    def callback_endpoint(self) -> Optional[str]:
        """Where this side's control server listens (listen endpoint, else the client's own)."""
        return self.dd._links.reply_endpoint or None  # noqa: SLF001

    def drop_links(self, keep: Sequence[int]) -> int:
        """Cleanup by the test: drop every link but those with `keep`; how many were dropped."""
        links = self.dd._links  # noqa: SLF001
        dropped = 0
        for cluster_id in links.linked_ids():
            if cluster_id not in keep:
                dropped += links._drop(cluster_id)  # noqa: SLF001
        return dropped

    def health(self) -> dict:
        thread = self.dd._links._server._thread  # noqa: SLF001
        return {"rss": _status_kb("VmRSS") << 10, "hwm": _status_kb("VmHWM") << 10,
                "fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
                "server_alive": thread is not None and thread.is_alive(),
                "shm": shm_files(os.getpid()),
                "proofs": [name for name in shm_files(os.getpid()) if ".proof." in name],
                "links": len(self.dd._links.linked_ids()),  # noqa: SLF001
                "mooncake": self.dd._links.mooncake_agent is not None}  # noqa: SLF001

    def reset_peak_rss(self) -> None:
        """Let VmHWM start again from the current RSS (Linux: write 5 to clear_refs)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def hold_file(self, path: str, content: bytes) -> dict:
        """Create `path` holding `content` and keep it open (a prover's file); its fd."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, content)
        self.__dict__.setdefault("held", []).append((fd, path))
        return {"fd": fd, "pid": os.getpid()}

    def release_files(self) -> None:
        for fd, path in self.__dict__.pop("held", []):
            os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def node(conn) -> None:
    """Child target: serve the `Node` methods until the parent says stop, then finalize."""
    instance = Node(conn)
    handlers = {name: getattr(instance, name) for name in dir(Node)
                if not name.startswith("_") and callable(getattr(Node, name, None))}
    try:
        serve(conn, handlers)
    finally:
        instance.release_files()
        instance.finalize()


__all__ = ["ALIVE_TIMEOUT_S", "Node", "RawPeer", "REPLY_TIMEOUT_S", "TAGS", "context", "frame",
           "frame_for", "junk_array", "message_strategy", "minimal", "node", "outcome",
           "status_of", "value_strategy"]
