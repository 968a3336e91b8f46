"""`LLMDataDistConnector`: vLLM's KV connector (`KVConnectorBase_V1`) on llm_datadist_torch.

vLLM builds it twice: the scheduler half (`SchedulerHalf`, in the engine-core process) and the
worker half (`WorkerHalf`, in each worker). This class only routes vLLM's calls to the half it
is; the request protocol is the NIXL connector's (pull, kv_transfer_params).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorRole,
                                                               KVConnectorTransferResults)

from .config import ConnectorConfig
from .scheduler import SchedulerHalf
from .stats import LLMDataDistKVConnectorStats, PromMetrics
from .worker import WorkerHalf

ROLES = {"kv_producer": (True, False), "kv_consumer": (False, True), "kv_both": (True, True)}



class LLMDataDistConnector(KVConnectorBase_V1):
    """Prefill/decode disaggregation over `LLMDataDist` pulls.

    `kv_transfer_config={"kv_connector": "LLMDataDistConnector",
    "kv_connector_module_path": "llm_datadist_torch.integrations.vllm",
    "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
    "kv_connector_extra_config": {...}}` (keys: `ConnectorConfig`). A prefill request carries
    `kv_transfer_params={"do_remote_decode": True}`; its output's kv_transfer_params go with the
    decode request, whose engine pulls the prompt's KV before computing.
    """

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        transfer_config = vllm_config.kv_transfer_config
        if transfer_config.kv_role not in ROLES:
            raise ValueError(f"LLMDataDistConnector: kv_role must be one of {sorted(ROLES)}, "
                             f"got {transfer_config.kv_role!r}")
        producer, consumer = ROLES[transfer_config.kv_role]
        config = ConnectorConfig.from_extra(transfer_config.kv_connector_extra_config)
        self._scheduler: Optional[SchedulerHalf] = None
        self._worker: Optional[WorkerHalf] = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerHalf(vllm_config, config, producer, consumer)
        else:
            self._worker = WorkerHalf(vllm_config, kv_cache_config, config, producer, consumer)

    # ---- scheduler half ---------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> Tuple[int, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self._scheduler.build_connector_meta(scheduler_output)

    def on_new_request(self, request) -> None:
        self._scheduler.on_new_request(request)

    def update_connector_output(self, connector_output) -> None:
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request, block_ids: List[int]) -> Tuple[bool, Optional[Dict[str, Any]]]:
        return self._scheduler.request_finished(request, block_ids)

    def set_xfer_handshake_metadata(self, metadata) -> None:
        self._scheduler.set_workers(metadata)

    def get_loaded_kv_cache_group_ids(self, request) -> Tuple[int, ...]:
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))

    # ---- worker half ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: Dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self):
        return self._worker.handshake() if self._worker is not None else None

    def start_load_kv(self, forward_context, **kwargs) -> None:
        self._worker.start_load_kv(self._connector_metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are whole requests, finished before the request is scheduled."""

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        """Nothing to save: decoders pull the prefill engine's blocks in place."""

    def wait_for_save(self) -> None:
        """Nothing to save."""

    def get_transfer_results(self, finished_req_ids) -> KVConnectorTransferResults:
        sending, recving, failed = self._worker.transfer_results(self._connector_metadata)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

    def get_finished(self, finished_req_ids):
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set:
        return self._worker.load_errors() if self._worker is not None else set()

    # ---- both -------------------------------------------------------------------------------
    def get_kv_connector_stats(self):
        if self._worker is not None:
            return self._worker.stats()
        return self._scheduler.get_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[Dict[str, Any]] = None):
        return LLMDataDistKVConnectorStats(data=data) if data else LLMDataDistKVConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return PromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()
