"""What the scheduler half tells the worker half each step (vLLM's connector metadata).

vLLM hands the scheduler's `ConnectorMetadata` to every worker before the step's forward pass;
it is pickled across processes, so it holds plain values only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Set

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorHandshakeMetadata,
                                                               KVConnectorMetadata)

from .side_channel import WorkerInfo


@dataclass
class RecvJob:
    """Pull `remote_block_ids` of the prefill engine's request into our `local_block_ids`."""

    request_id: str
    local_block_ids: List[int]
    remote_block_ids: List[int]
    remote_engine_id: str
    remote_request_id: str
    remote_host: str
    remote_port: int
    remote_tp_size: int
    lease_token: str


@dataclass
class ConnectorMetadata(KVConnectorMetadata):
    recv: List[RecvJob] = field(default_factory=list)
    # Prefill side: requests whose blocks the decoders are done with (or whose lease ran out):
    # every worker reports them finished sending, and vLLM frees the blocks.
    finished_sending: Set[str] = field(default_factory=set)
    # Nothing is scheduled this step: the worker may wait a little for a pull to complete.
    idle: bool = False


@dataclass
class WorkerHandshake(KVConnectorHandshakeMetadata):
    """A worker's data-plane address and geometry, collected by vLLM for the scheduler."""

    info: WorkerInfo
