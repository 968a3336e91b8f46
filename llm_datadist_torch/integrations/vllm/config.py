"""The connector's settings: `kv_connector_extra_config`, read once, checked, with defaults.

Nothing here imports vLLM; `ConnectorConfig.from_extra` takes the plain dict.
"""
from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

ANY_HOST = ("", "0.0.0.0", "::")
# The integration logs under vLLM's logger ("vllm.llm_datadist_torch.integrations.vllm.<module>"),
# so its records reach vLLM's handlers at vLLM's level, in every vLLM process.
LOGGER_PREFIX = "vllm."
TRANSFER_BACKENDS = ("", "hixl", "local", "shm", "cma", "mooncake")


@dataclass(frozen=True)
class ConnectorConfig:
    """`kv_connector_extra_config` keys (all optional).

    host               where the prefill side listens (side channel and data plane);
                       default 127.0.0.1, i.e. one host
    advertise_host     the address peers use to reach `host` (default: `host`, or this host's
                       primary address when `host` binds every interface)
    side_channel_port  the scheduler's side channel (handshake, lease renewals, releases):
                       this port + the data-parallel index; 0 (default): a free port. It is
                       the `remote_port` of the kv_transfer_params
    base_port          worker rank r's data plane (`LLMDataDist` listen_ip_info) listens on
                       base_port + r (+ data-parallel index x TP size); 0 (default): a free
                       port per worker
    lease_s            how long the prefill side keeps a finished request's blocks for a
                       decoder that neither pulled them nor renewed the lease (default 30)
    transfer_backend   forces an `LLMConfig.transfer_backend` ("cma", "shm", "mooncake", ...);
                       default: automatic (same host: shm/cma; across hosts: mooncake)
    sync_kv_timeout_ms deadline of one pull (`LLMConfig.sync_kv_timeout`, default 10000)
    link_timeout_ms    deadline of `link_clusters` to a peer (default 3000)
    rpc_timeout_s      deadline of one side-channel request (default 5)
    pull_threads       worker threads that run pulls off the forward thread (default 2)
    idle_wait_ms       while an engine only waits for transfers, each of its idle steps waits
                       this long for a completion instead of spinning (default 5)
    """

    host: str = "127.0.0.1"
    advertise_host: str = ""
    side_channel_port: int = 0
    base_port: int = 0
    lease_s: float = 30.0
    transfer_backend: str = ""
    sync_kv_timeout_ms: int = 10000
    link_timeout_ms: int = 3000
    rpc_timeout_s: float = 5.0
    pull_threads: int = 2
    idle_wait_ms: float = 5.0

    @classmethod
    def from_extra(cls, extra: Optional[Dict[str, Any]]) -> "ConnectorConfig":
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(f"LLMDataDistConnector: unknown kv_connector_extra_config keys "
                             f"{unknown}; known: {sorted(known)}")
        values = {}
        for name, value in extra.items():
            kind = type(known[name].default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"LLMDataDistConnector: kv_connector_extra_config[{name!r}] "
                                 f"must be {kind.__name__}, got {value!r}")
            values[name] = value
        config = cls(**values)
        config._check()
        return config

    def _check(self) -> None:
        for name in ("side_channel_port", "base_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"LLMDataDistConnector: {name} must be a port, got "
                                 f"{getattr(self, name)}")
        if self.transfer_backend not in TRANSFER_BACKENDS:
            raise ValueError(f"LLMDataDistConnector: transfer_backend must be one of "
                             f"{TRANSFER_BACKENDS}, got {self.transfer_backend!r}")
        for name in ("lease_s", "rpc_timeout_s", "sync_kv_timeout_ms", "link_timeout_ms",
                     "pull_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LLMDataDistConnector: {name} must be > 0")
        if self.idle_wait_ms < 0:
            raise ValueError("LLMDataDistConnector: idle_wait_ms must be >= 0")

    @property
    def public_host(self) -> str:
        """The address this side reports to peers."""
        if self.advertise_host:
            return self.advertise_host
        if self.host not in ANY_HOST:
            return self.host
        return primary_address()


def primary_address() -> str:
    """This host's address on the interface of its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed to anyone
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def local_address_towards(host: str) -> str:
    """The local address a connection to `host` leaves from (for `append_local_ip_info`)."""
    if host.startswith("127."):
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def free_port(host: str) -> int:
    """A port nobody listens on at `host` right now (bound then released: a later bind by
    someone else can still win the race; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host if host not in ANY_HOST else "0.0.0.0", 0))
        return sock.getsockname()[1]


def cluster_id_of(engine_id: str, rank: int) -> int:
    """The `LLMDataDist` cluster id of worker `rank` of engine `engine_id`: stable, the same
    in every process that knows the pair, below 2**63."""
    digest = hashlib.blake2b(f"{engine_id}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)
