"""Mooncake Transfer Engine directly: TCP, P2PHANDSHAKE (no metadata server).

Each process runs a `TransferEngine` on 127.0.0.1 and registers its buffer; the server hands its
RPC port and buffer address to the client, which reads the block list with
`batch_transfer_sync_read` (in batches of at most 1024 blocks: Mooncake's TCP transport fails a
larger batch to one peer outright, see `llm_datadist_torch.transport.mooncake.agent`).
"""
from __future__ import annotations

import os

LABEL = "mooncake-te-tcp"
DISTRIBUTION = "mooncake-transfer-engine-non-cuda"
IMPORT = "mooncake"
INSTALL = ("pip install mooncake-transfer-engine-non-cuda && "
           "apt-get install -y libibverbs1 libnl-3-200 libnl-route-3-200")
HOST = "127.0.0.1"
BATCH = 1024


def setup() -> str:
    return f"tcp on {HOST}, P2PHANDSHAKE, batch_transfer_sync_read of <= {BATCH} blocks"


def _engine():
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # it logs every handshake at INFO
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    rc = engine.initialize(HOST, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"TransferEngine.initialize returned {rc}")
    return engine


def _register(engine, tensor) -> int:
    rc = engine.register_memory(tensor.data_ptr(), tensor.numel())
    if rc != 0:
        raise RuntimeError(f"TransferEngine.register_memory returned {rc}")
    return tensor.data_ptr()


class Server:
    def __init__(self, tensor):
        self.engine = _engine()
        self.base = _register(self.engine, tensor)

    def endpoint(self):
        return f"{HOST}:{self.engine.get_rpc_port()}", self.base

    def on_message(self, message) -> None:
        pass

    def close(self) -> None:
        self.engine.unregister_memory(self.base)


class Client:
    def __init__(self, tensor, endpoint, conn):
        self.target, self.remote_base = endpoint
        self.engine = _engine()
        self.base = _register(self.engine, tensor)

    def reader(self, src, dst, length: int):
        batches = [([self.base + o for o in dst[i:i + BATCH]],
                    [self.remote_base + o for o in src[i:i + BATCH]],
                    [length] * len(dst[i:i + BATCH])) for i in range(0, len(dst), BATCH)]

        def read() -> None:
            for local, remote, lengths in batches:
                rc = self.engine.batch_transfer_sync_read(self.target, local, remote, lengths)
                if rc != 0:
                    raise RuntimeError(f"batch_transfer_sync_read returned {rc}")
        return read

    def close(self) -> None:
        self.engine.unregister_memory(self.base)
