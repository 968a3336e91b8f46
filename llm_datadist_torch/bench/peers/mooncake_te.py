"""Mooncake Transfer Engine directly: TCP, P2PHANDSHAKE (no metadata server).

Each process runs a `TransferEngine` on 127.0.0.1 and registers its buffer; the server hands its
RPC port and buffer address to the client, which reads the block list with
`batch_transfer_sync_read` (in batches of at most 1024 blocks: Mooncake's TCP transport fails a
larger batch to one peer outright, see `llm_datadist_torch.transport.mooncake.agent`). For the
model suite (`batch_reader`) every K and V tensor is registered on its own and a call reads its
k x T blocks the same way.
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


def model_setup() -> str:
    return (f"tcp on {HOST}, P2PHANDSHAKE, every tensor registered; per call "
            f"batch_transfer_sync_read of the k x T blocks in batches of <= {BATCH}")


def _tensors(tensor) -> list:
    return list(tensor) if isinstance(tensor, (list, tuple)) else [tensor]


def _engine():
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # it logs every handshake at INFO
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    rc = engine.initialize(HOST, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"TransferEngine.initialize returned {rc}")
    return engine


def _register(engine, tensors) -> list:
    """Register every tensor; their addresses (the first is the base of `reader`'s offsets)."""
    addrs = []
    for tensor in tensors:
        rc = engine.register_memory(tensor.data_ptr(), tensor.numel())
        if rc != 0:
            for addr in addrs:
                engine.unregister_memory(addr)
            raise RuntimeError(f"TransferEngine.register_memory returned {rc}")
        addrs.append(tensor.data_ptr())
    return addrs


class Server:
    def __init__(self, tensor):
        self.engine = _engine()
        self.addrs = _register(self.engine, _tensors(tensor))
        self.base = self.addrs[0]

    def endpoint(self):
        return f"{HOST}:{self.engine.get_rpc_port()}", self.base

    def on_message(self, message) -> None:
        pass

    def close(self) -> None:
        for addr in self.addrs:
            self.engine.unregister_memory(addr)


class Client:
    def __init__(self, tensor, endpoint, conn):
        self.target, self.remote_base = endpoint
        self.engine = _engine()
        self.addrs = _register(self.engine, _tensors(tensor))
        self.base = self.addrs[0]

    def _read(self, local, remote, length: int):
        batches = [(local[i:i + BATCH], remote[i:i + BATCH], [length] * len(local[i:i + BATCH]))
                   for i in range(0, len(local), BATCH)]

        def read() -> None:
            for here, there, lengths in batches:
                rc = self.engine.batch_transfer_sync_read(self.target, here, there, lengths)
                if rc != 0:
                    raise RuntimeError(f"batch_transfer_sync_read returned {rc}")
        return read

    def reader(self, src, dst, length: int):
        return self._read([self.base + o for o in dst], [self.remote_base + o for o in src], length)

    def batch_reader(self, remote_addrs, local_addrs, length: int):
        def prepare(remote_indices, local_indices):
            return self._read([local_addrs[i] for i in local_indices],
                              [remote_addrs[i] for i in remote_indices], length)
        return prepare

    def close(self) -> None:
        for addr in self.addrs:
            self.engine.unregister_memory(addr)
