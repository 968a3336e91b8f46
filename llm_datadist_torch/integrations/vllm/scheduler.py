"""The scheduler half of the connector: decides what to pull and keeps the prefill leases.

Runs in vLLM's engine-core process (once per engine); talks to the worker half only through
`ConnectorMetadata` (each step) and the workers' reports (`update_connector_output`).

Prefill side (kv_producer / kv_both): a request that carries `do_remote_decode` and finishes
keeps its blocks (`request_finished` returns delay_free=True) under a lease (`LeaseTable`); the
returned kv_transfer_params tell the decoder where to pull from. The side channel serves the
handshake and the decoders' renewals and releases; released or expired requests go to the
workers as `finished_sending`, and vLLM frees their blocks.

Decode side (kv_consumer / kv_both): a request that carries `do_remote_prefill` counts the
prompt tokens the prefill engine computed as loadable asynchronously; once vLLM allocated its
blocks, a `RecvJob` goes to the workers, which pull and report it finished receiving. Until then
its lease is renewed (`LeaseKeeper`); a request dropped before its pull releases the blocks.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

from vllm.v1.request import RequestStatus

from .config import LOGGER_PREFIX, ConnectorConfig
from .leases import LeaseTable
from .metadata import ConnectorMetadata, RecvJob, WorkerHandshake
from .renewals import LeaseKeeper
from .side_channel import (ErrorReply, Hello, HelloReply, Release, ReleaseReply, Renew,
                           RenewReply, SideChannelServer, Status, StatusReply, WorkerInfo)
from .stats import TransferStats

logger = logging.getLogger(LOGGER_PREFIX + __name__)

REQUIRED = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port",
            "remote_block_ids", "lease_token")
FINISHED_OK = (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)


def flat_block_ids(value) -> List[int]:
    """`remote_block_ids` as one list (a single KV cache group; also accepts `[[...]]`)."""
    if value and isinstance(value[0], (list, tuple)):
        if len(value) != 1:
            raise ValueError("LLMDataDistConnector supports one KV cache group")
        value = value[0]
    return [int(block) for block in value]


class SchedulerHalf:
    def __init__(self, vllm_config, config: ConnectorConfig, producer: bool, consumer: bool):
        self._config = config
        self.producer, self.consumer = producer, consumer
        transfer_config = vllm_config.kv_transfer_config
        self.engine_id: str = transfer_config.engine_id
        self.block_size: int = vllm_config.cache_config.block_size
        self.tp_size: int = vllm_config.parallel_config.tensor_parallel_size
        self._workers: Dict[int, WorkerInfo] = {}
        self._jobs: List[RecvJob] = []
        self._stats = TransferStats()
        self._freed_reported = {"released": 0, "expired": 0}
        self.leases: Optional[LeaseTable] = None
        self._server: Optional[SideChannelServer] = None
        self._keeper: Optional[LeaseKeeper] = None
        if producer:
            self.leases = LeaseTable(config.lease_s, self.tp_size)
            port = config.side_channel_port
            if port:
                port += vllm_config.parallel_config.data_parallel_index
            self._server = SideChannelServer(config.host, port, self._serve)
            self.port = self._server.port
            logger.info("LLMDataDistConnector: engine %s serves its side channel at %s:%d",
                        self.engine_id, config.public_host, self.port)
        if consumer:
            # Short calls: one thread renews for every peer, a dead one must not hold it up.
            self._keeper = LeaseKeeper(min(config.rpc_timeout_s, 2.0))

    # ---- prefill side -----------------------------------------------------------------------
    def set_workers(self, metadata: Dict[int, WorkerHandshake]) -> None:
        self._workers = {rank: handshake.info for rank, handshake in metadata.items()}

    def _serve(self, request):
        if isinstance(request, Hello):
            worker = self._workers.get(request.rank)
            if worker is None:
                return ErrorReply(f"engine {self.engine_id} has no worker of rank "
                                  f"{request.rank} (tensor-parallel size {self.tp_size})")
            return HelloReply(self.engine_id, self.tp_size, self.leases.lease_s, worker)
        if isinstance(request, Renew):
            return RenewReply(self.leases.renew(request.leases))
        if isinstance(request, Release):
            return ReleaseReply(self.leases.release(request.request_id, request.token,
                                                    request.rank))
        if isinstance(request, Status):
            return StatusReply(**self.leases.status())
        return ErrorReply(f"unexpected request {type(request).__name__}")

    def _finished_prefill(self, request, block_ids: List[int]) -> Tuple[bool, Optional[dict]]:
        if request.status not in FINISHED_OK or not block_ids:
            return False, None  # aborted, or nothing computed: free the blocks now
        token = self.leases.open(request.request_id)
        return True, dict(
            do_remote_prefill=True, do_remote_decode=False,
            remote_engine_id=self.engine_id, remote_request_id=request.request_id,
            remote_host=self._config.public_host, remote_port=self.port,
            remote_block_ids=list(block_ids), remote_num_tokens=request.num_computed_tokens,
            tp_size=self.tp_size, lease_token=token, lease_s=self.leases.lease_s)

    # ---- decode side ------------------------------------------------------------------------
    def _wants_pull(self, params) -> bool:
        if not (self.consumer and params and params.get("do_remote_prefill")):
            return False
        missing = [key for key in REQUIRED if key not in params]
        if missing:
            logger.warning("LLMDataDistConnector: kv_transfer_params without %s: the prompt is "
                           "computed here", missing)
            return False
        return True

    @staticmethod
    def _peer(params) -> Tuple[str, int]:
        return str(params["remote_host"]), int(params["remote_port"])

    def on_new_request(self, request) -> None:
        params = request.kv_transfer_params
        if self._wants_pull(params):
            self._keeper.renew(request.request_id, self._peer(params),
                               str(params["remote_request_id"]), str(params["lease_token"]),
                               float(params.get("lease_s") or self._config.lease_s))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> Tuple[int, bool]:
        params = request.kv_transfer_params
        if not self._wants_pull(params):
            return 0, False
        prompt = len(request.prompt_token_ids or ())
        loadable = min(prompt, int(params.get("remote_num_tokens") or prompt))
        count = loadable - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not self._wants_pull(params):
            return
        params["do_remote_prefill"] = False  # one transfer per request
        peer, remote_id = self._peer(params), str(params["remote_request_id"])
        token = str(params["lease_token"])
        if num_external_tokens <= 0:  # e.g. a local prefix-cache hit covers it all
            self._keeper.stop(request.request_id)
            self._keeper.release_all_ranks(peer, remote_id, token)
            return
        group = blocks.blocks[0]
        cached = sum(1 for block in group if block.block_hash is not None and not block.is_null)
        fresh = [block.block_id for block in group if block.block_hash is None and not block.is_null]
        needed = -(-(cached * self.block_size + num_external_tokens) // self.block_size) - cached
        remote = flat_block_ids(params["remote_block_ids"])[cached:cached + needed]
        self._jobs.append(RecvJob(
            request_id=request.request_id, local_block_ids=fresh[:needed],
            remote_block_ids=remote, remote_engine_id=str(params["remote_engine_id"]),
            remote_request_id=remote_id, remote_host=peer[0], remote_port=peer[1],
            remote_tp_size=int(params.get("tp_size") or 1), lease_token=token))

    # ---- both -------------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output) -> ConnectorMetadata:
        idle = scheduler_output.total_num_scheduled_tokens == 0
        jobs, self._jobs = self._jobs, []
        finished_sending = set()
        if self.leases is not None:
            wait_s = self._config.idle_wait_ms / 1000 if idle and not jobs else 0.0
            finished_sending = self.leases.take_freeable(wait_s)
        return ConnectorMetadata(recv=jobs, finished_sending=finished_sending, idle=idle)

    def update_connector_output(self, output) -> None:
        if self._keeper is not None:
            for request_id in output.finished_recving or ():
                self._keeper.stop(request_id)

    def request_finished(self, request, block_ids: List[int]) -> Tuple[bool, Optional[Dict[str, Any]]]:
        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("do_remote_decode"):
            if not self.producer:
                return False, None
            return self._finished_prefill(request, block_ids)
        if self._keeper is not None:
            self._keeper.stop(request.request_id)
            if self._wants_pull(params):  # finished before its blocks were even allocated
                params["do_remote_prefill"] = False
                self._keeper.release_all_ranks(self._peer(params),
                                               str(params["remote_request_id"]),
                                               str(params["lease_token"]))
        return False, None

    def get_stats(self) -> Optional[TransferStats]:
        if self.leases is None:
            return None
        counters = self.leases.status()
        for outcome in ("released", "expired"):
            delta = counters[outcome] - self._freed_reported[outcome]
            if delta:
                self._stats.count_lease(outcome, delta)
                self._freed_reported[outcome] = counters[outcome]
        return self._stats.take()

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._keeper is not None:
            self._keeper.close()
