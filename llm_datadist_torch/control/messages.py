"""Control-plane messages: frozen, tagged msgspec Structs, encoded as msgpack (never pickle).

To add a message: define a Struct deriving from `Message` with a new, unique ``tag`` and append
it to `MESSAGE_TYPES`. Tags, not class names, go on the wire, so classes may be renamed freely;
a tag must never be reused for a different meaning. Adding a message type, or a field with a
default, is backwards-compatible for decoders that know it; anything else bumps PROTOCOL_VERSION.
"""
from __future__ import annotations

from typing import Annotated, Optional, Union

import msgspec

from ..core.descriptors import Fence, Geometry, Region

# Wire frame (codec.py): msgpack array ``[protocol_version, message]``. Element 0 stays the
# version in every future version, so a peer can always tell "other version" from "garbage".
# History:
#   1 - first version: Hello/HelloReply, Ping/Pong, ErrorReply, Resolve/Resolved, Release,
#       Unlink, Ack. Later, compatibly: `mooncake_endpoint`, `mooncake_required` on
#       Hello/HelloReply; MooncakeEndpoint; Invalidate; Resolved.keyed_slots;
#       StageRead/StageWrite/StageArea/Staged; Locate/Located.
#   2 - geometry as a `Geometry` struct; the handshake no longer carries role, device kind,
#       transports or a second protocol version (none was ever read). Sessions: the handshake
#       gives each side a secret token, and every later request carries the token of the link
#       it is served as instead of a cluster id; the handshake proves same process / same
#       host (identity.py) instead of trusting pid and host id; limits on every field.
#   3 - `Release` carries a batch of `Pulled` notices, each naming the cache its key was bound
#       to; `Resolve.released` carries the notices not acknowledged yet (ops/releases.py).
PROTOCOL_VERSION = 3

# Bytes of the staging area an owner keeps for each linked requester (StageRead / StageWrite).
STAGING_BYTES = 64 << 20

# Limits checked at decode time: a hostile frame fails to decode instead of costing memory
# and time on the serving thread.
MAX_ITEMS = 1 << 20  # block, offset and address lists
MAX_TENSORS = 1 << 16
U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack integers stop at 2**64 - 1
Index = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # offsets, lengths, indices, sizes
Blocks = Annotated[list[Index], msgspec.Meta(max_length=MAX_ITEMS)]
Tensors = Annotated[list[Annotated[int, msgspec.Meta(ge=0, lt=MAX_TENSORS)]],
                    msgspec.Meta(max_length=MAX_TENSORS)]
Token = Annotated[bytes, msgspec.Meta(max_length=64)]
Text = Annotated[str, msgspec.Meta(max_length=256)]
MAX_RELEASES = 1024  # release notices in one message


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every control message; the subclass's ``tag`` names it on the wire."""


class _PeerIdentity(Message, frozen=True, kw_only=True):
    """Who a side says it is; sent by both sides of the handshake. Claims only: what the
    transports rely on is proven (identity.py)."""

    cluster_id: U64
    host_id: Text  # host.local_host_id(): equal ids mean the same kernel (a claim)
    pid: Index
    mooncake_endpoint: Text = ""  # "ip:rpc_port" of this side's Mooncake agent; "" if none runs
    mooncake_required: bool = False  # this side forces mooncake: the other must run an agent
    challenge: Token = b""  # fresh random bytes the other side proves it shares a host with
    session: Token = b""  # the token the other side must put in every request to this side


class Hello(_PeerIdentity, tag="hello", frozen=True, kw_only=True):
    """Handshake request, the first exchange on every link."""

    reply_endpoint: Text = ""  # where the caller's own server listens; "" when it has none


class HelloReply(_PeerIdentity, tag="hello_reply", frozen=True, kw_only=True):
    """Handshake answer: the server's identity, whether it accepts the link and its proof of
    sharing the client's host (a /dev/shm file holding the client's challenge, held open as
    `proof_fd`)."""

    accepted: bool
    status_code: int  # LLMStatusCode value; LLM_SUCCESS when accepted
    message: str = ""
    proof_name: Text = ""
    proof_fd: int = -1
    auth: Token = b""  # with a shared key: HMAC over both challenges (auth.py)


class Proof(Message, tag="proof", frozen=True, kw_only=True):
    """Client -> server after an accepted handshake that asked for it: the client's MAC (with
    a shared key) and/or its proof of sharing the server's host (the server's challenge in a
    /dev/shm file the client holds open)."""

    session: Token
    mac: Token = b""
    proof_name: Text = ""
    proof_fd: int = -1


class Ping(Message, tag="ping", frozen=True, kw_only=True):
    """Liveness probe; with a session, also "do you still hold this link?" (an error if not)."""

    session: Token = b""


class Pong(Message, tag="pong", frozen=True, kw_only=True):
    """Answer to `Ping`."""


class ErrorReply(Message, tag="error", frozen=True, kw_only=True):
    """A request failed on the serving side; the client raises LLMException(status_code)."""

    status_code: int  # LLMStatusCode value
    message: str


class Pulled(msgspec.Struct, frozen=True, kw_only=True):
    """A release notice: these tensors of cache `cache_id` were pulled through request `key`
    (spec §14.3). The owner applies it only while `key` is still bound to that cache, so a
    notice delivered twice, or late, cannot release a later binding of the same key."""

    key: Annotated[list[Union[Text, int]], msgspec.Meta(max_length=3)]
    cache_id: int
    tensors: Tensors


Notices = Annotated[list[Pulled], msgspec.Meta(max_length=MAX_RELEASES)]


class Resolve(Message, tag="resolve", frozen=True, kw_only=True):
    """Requester -> owner: name a cache by key and describe the pull or push to be checked."""

    session: Token  # the link it is served as
    key_kind: Text  # "cache_key" | "id_index" | "blocks"
    req_id: U64
    prefix_id: U64
    model_id: U64
    cache_id: int
    batch_index: Index
    direction: Text  # "pull" (owner is the source) | "push" (owner is the destination)
    op: Text  # "c2c" | "b2b" | "c2b"
    geometry: Geometry  # the requester's cache
    placement: int
    requester_slot: Index
    nbytes: int
    src_blocks: Blocks
    dst_blocks: Blocks
    src_tensors: Tensors
    dst_tensors: Tensors
    # Release notices not acknowledged yet: applied before this request is answered, so
    # a key released by an earlier pull is gone for this one.
    released: Notices = []


class Resolved(Message, tag="resolved", frozen=True, kw_only=True):
    """Owner -> requester: the checked cache's geometry and the regions the request may use."""

    cache_id: int
    geometry: Geometry
    placement: int
    slot: int
    regions: Annotated[dict[int, Region], msgspec.Meta(max_length=MAX_TENSORS)]
    fence: Fence  # read it after reading (and before writing) the regions: fences.py
    release_key: Optional[tuple[str, int, int]] = None  # report a pull through this key
    keyed_slots: Blocks = []  # slots with a bound key: a pull by id must come back here


class Release(Message, tag="release", frozen=True, kw_only=True):
    """Requester -> owner: release notices not acknowledged yet (one batch)."""

    session: Token
    pulled: Notices


class Unlink(Message, tag="unlink", frozen=True, kw_only=True):
    """Requester -> owner: drop the link with `requester`."""

    session: Token


class Ack(Message, tag="ack", frozen=True, kw_only=True):
    """A request succeeded and has nothing to return."""


class MooncakeEndpoint(Message, tag="mooncake_endpoint", frozen=True, kw_only=True):
    """Client -> server after the handshake: the client started its Mooncake agent only once the
    reply showed that the link needs one (peer on another host, or a side forcing mooncake)."""

    session: Token
    endpoint: Text


class Invalidate(Message, tag="invalidate", frozen=True, kw_only=True):
    """Owner -> requester: forget what `Resolved` said about these caches (they are gone, or
    their blocks key names another cache now)."""

    session: Token
    cache_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_ITEMS)]


class StageRead(Message, tag="stage_read", frozen=True, kw_only=True):
    """Requester -> owner: copy these segments of each tensor of cache `cache_id` (memory the
    requester cannot reach, e.g. device memory) into the owner's staging area, packed tensor
    by tensor in the order given."""

    session: Token
    cache_id: int
    fence: int  # the value of the cache's fence word in the answer that named it
    tensors: Tensors
    offsets: Blocks
    lengths: Blocks


class StageWrite(StageRead, tag="stage_write", frozen=True, kw_only=True):
    """Requester -> owner: unpack the staging area (written by the requester) into these
    segments; the reverse of `StageRead`."""


class StageArea(Message, tag="stage_area", frozen=True, kw_only=True):
    """Requester -> owner: where the staging area for this link is."""

    session: Token


class Staged(Message, tag="staged", frozen=True, kw_only=True):
    """Owner -> requester: the staging area (host memory every transport can reach)."""

    region: Region


class Locate(Message, tag="locate", frozen=True, kw_only=True):
    """Requester -> owner: which cache tensors hold ``[address, address + nbytes)`` for each of
    these raw addresses (`transfer_cache_async` with `TransferConfig` writes by address)."""

    session: Token
    addresses: Blocks
    nbytes: Index


class Place(msgspec.Struct, frozen=True, kw_only=True):
    """Where a located address lies: tensor `tensor` of cache `cache_id`, `offset` bytes in
    (not a message; part of `Located`)."""

    cache_id: int
    tensor: int
    offset: int
    region: Region
    fence: Fence


class Located(Message, tag="located", frozen=True, kw_only=True):
    """Owner -> requester: one `Place` per address of `Locate`, in order."""

    places: Annotated[list[Place], msgspec.Meta(max_length=MAX_ITEMS)]


# Every type the codec can decode. Append new message types here.
MESSAGE_TYPES = (
    Hello,
    HelloReply,
    Ping,
    Pong,
    ErrorReply,
    Resolve,
    Resolved,
    Release,
    Unlink,
    Ack,
    MooncakeEndpoint,
    Proof,
    Invalidate,
    StageRead,
    StageWrite,
    StageArea,
    Staged,
    Locate,
    Located,
)

AnyMessage = Union[MESSAGE_TYPES]  # type: ignore[valid-type]
