"""NIXL with its UCX backend: `nixl_agent` per process, READ of the block list.

The server registers its bytes and hands `get_agent_metadata()` to the client through the pipe;
the client registers its buffer, `add_remote_agent`s the server and, per block size, prepares
one READ request over all blocks (`initialize_xfer`), then posts it with `transfer` and polls
`check_xfer_state` until DONE. For the model suite (`batch_reader`) each of the K and V tensors
is registered on its own, as vLLM's NIXL connector does; both sides' descriptor lists are
prepared once per block size (`prep_xfer_dlist`) and every call is `make_prepped_xfer` of the
entries it reads, `transfer`, polling, `release_xfer_handle`: what that connector pays per
request. UCX picks its own transports (`UCX_TLS` applies; on one host it uses cma for the reads).
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


def model_setup() -> str:
    return (f"UCX_TLS={os.environ.get('UCX_TLS', '(unset: UCX picks)')}, every tensor registered, "
            "prep_xfer_dlist per block size; per call make_prepped_xfer, transfer, poll, "
            "release_xfer_handle")


def _agent(name: str):
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def _tensors(tensor) -> list:
    return list(tensor) if isinstance(tensor, (list, tuple)) else [tensor]


def _rows(base: int, offsets, length: int) -> np.ndarray:
    """Descriptor rows (address, length, device id 0 for DRAM) of `length` bytes at `offsets`."""
    rows = np.empty((len(offsets), 3), dtype=np.uint64)
    rows[:, 0] = base + np.asarray(offsets, dtype=np.uint64)
    rows[:, 1] = length
    rows[:, 2] = 0
    return rows


class Server:
    def __init__(self, tensor):
        tensors = _tensors(tensor)
        self.agent = _agent(f"bench-server-{os.getpid()}")
        self.registered = self.agent.register_memory(tensors)
        self.base = tensors[0].data_ptr()

    def endpoint(self):
        return self.agent.get_agent_metadata(), self.base

    def on_message(self, message) -> None:
        pass

    def close(self) -> None:
        self.agent.deregister_memory(self.registered)


class Client:
    def __init__(self, tensor, endpoint, conn):
        metadata, self.remote_base = endpoint
        tensors = _tensors(tensor)
        self.agent = _agent(f"bench-client-{os.getpid()}")
        self.registered = self.agent.register_memory(tensors)
        self.base = tensors[0].data_ptr()
        self.remote = self.agent.add_remote_agent(metadata)
        self.handles = []
        self.dlists = []

    def _descs(self, base: int, offsets, length: int):
        return self.agent.get_xfer_descs(_rows(base, offsets, length), "DRAM")

    def _wait(self, handle, state: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while state == "PROC":
            if time.monotonic() > deadline:
                raise TimeoutError(f"NIXL READ not done after {TIMEOUT_S:.0f} s")
            state = self.agent.check_xfer_state(handle)
        if state != "DONE":
            raise RuntimeError(f"NIXL READ failed: state {state}")

    def reader(self, src, dst, length: int):
        handle = self.agent.initialize_xfer(
            "READ", self._descs(self.base, dst, length), self._descs(self.remote_base, src, length),
            self.remote)
        self.handles.append(handle)

        def read() -> None:
            self._wait(handle, self.agent.transfer(handle))
        return read

    def batch_reader(self, remote_addrs, local_addrs, length: int):
        remote = self.agent.prep_xfer_dlist(self.remote, _rows(0, remote_addrs, length), "DRAM")
        local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", _rows(0, local_addrs, length),
                                           "DRAM")
        self.dlists += [local, remote]

        def prepare(remote_indices, local_indices):
            remote_at = np.asarray(remote_indices, dtype=np.int32)
            local_at = np.asarray(local_indices, dtype=np.int32)

            def read() -> None:
                handle = self.agent.make_prepped_xfer("READ", local, local_at, remote, remote_at)
                try:
                    self._wait(handle, self.agent.transfer(handle))
                finally:
                    self.agent.release_xfer_handle(handle)
            return read
        return prepare

    def close(self) -> None:
        for handle in self.handles:
            self.agent.release_xfer_handle(handle)
        for dlist in self.dlists:
            self.agent.release_dlist_handle(dlist)
        self.agent.remove_remote_agent(self.remote)
        self.agent.deregister_memory(self.registered)
