"""NIXL with its UCX backend: `nixl_agent` per process, READ of the block list.

The server registers its bytes and hands `get_agent_metadata()` to the client through the pipe;
the client registers its buffer, `add_remote_agent`s the server and, per block size, prepares
one READ request over all blocks (`initialize_xfer`), then posts it with `transfer` and polls
`check_xfer_state` until DONE. UCX picks its own transports (`UCX_TLS` applies; on one host it
uses cma for the reads).
"""
from __future__ import annotations

import os
import time

import numpy as np

LABEL = "nixl-ucx"
DISTRIBUTION = "nixl"
IMPORT = "nixl"
INSTALL = "pip install nixl-cu12==1.5.1 && pip install --no-deps nixl==1.5.1"
TIMEOUT_S = 60.0  # one read; the harness also bounds the whole run


def setup() -> str:
    return f"UCX_TLS={os.environ.get('UCX_TLS', '(unset: UCX picks)')}, one prepared READ per call"


def _agent(name: str):
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


class Server:
    def __init__(self, tensor):
        self.agent = _agent(f"bench-server-{os.getpid()}")
        self.registered = self.agent.register_memory(tensor)
        self.base = tensor.data_ptr()

    def endpoint(self):
        return self.agent.get_agent_metadata(), self.base

    def on_message(self, message) -> None:
        pass

    def close(self) -> None:
        self.agent.deregister_memory(self.registered)


class Client:
    def __init__(self, tensor, endpoint, conn):
        metadata, self.remote_base = endpoint
        self.agent = _agent(f"bench-client-{os.getpid()}")
        self.registered = self.agent.register_memory(tensor)
        self.base = tensor.data_ptr()
        self.remote = self.agent.add_remote_agent(metadata)
        self.handles = []

    def _descs(self, base: int, offsets, length: int):
        rows = np.empty((len(offsets), 3), dtype=np.uint64)
        rows[:, 0] = base + np.asarray(offsets, dtype=np.uint64)
        rows[:, 1] = length
        rows[:, 2] = 0  # device id; 0 for DRAM
        return self.agent.get_xfer_descs(rows, "DRAM")

    def reader(self, src, dst, length: int):
        handle = self.agent.initialize_xfer(
            "READ", self._descs(self.base, dst, length), self._descs(self.remote_base, src, length),
            self.remote)
        self.handles.append(handle)

        def read() -> None:
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + TIMEOUT_S
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"NIXL READ not done after {TIMEOUT_S:.0f} s")
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL READ failed: state {state}")
        return read

    def close(self) -> None:
        for handle in self.handles:
            self.agent.release_xfer_handle(handle)
        self.agent.remove_remote_agent(self.remote)
        self.agent.deregister_memory(self.registered)
