"""Transfer statistics through vLLM's connector stats hooks.

Workers record one entry per pulled request (peer engine, request, bytes, seconds, outcome);
the prefill scheduler counts leases that ended released or expired. vLLM collects them each step
(`get_kv_connector_stats`), merges workers' and the scheduler's (`aggregate`), logs a summary
per interval (`reduce`: "KV Transfer metrics: ...") and feeds Prometheus (`PromMetrics`, with
`disable_log_stats=False`; `LLM.get_metrics()` reads them back).
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)
from vllm.v1.metrics.utils import create_metric_per_engine

MAX_ENTRIES = 4096  # per step, so that a stuck logger cannot grow memory without bound
PREFIX = "vllm:llmdd_"


def _empty() -> Dict[str, Any]:
    return {"transfers": [], "leases_released": 0, "leases_expired": 0}


@dataclass
class LLMDataDistKVConnectorStats(KVConnectorStats):
    """`data`: `transfers` = [[peer engine id, request id, bytes, seconds, ok, error], ...],
    `leases_released` / `leases_expired` = counts (prefill side)."""

    def __post_init__(self):
        if not self.data:
            self.data = _empty()

    def reset(self):
        self.data = _empty()

    def is_empty(self) -> bool:
        return not (self.data["transfers"] or self.data["leases_released"]
                    or self.data["leases_expired"])

    def clone_and_reset(self) -> "LLMDataDistKVConnectorStats":
        clone = copy.deepcopy(self)
        self.reset()
        return clone

    def aggregate(self, other: KVConnectorStats) -> "LLMDataDistKVConnectorStats":
        if other is not None and not other.is_empty():
            self.data["transfers"] = (self.data["transfers"] + other.data["transfers"])[-MAX_ENTRIES:]
            for key in ("leases_released", "leases_expired"):
                self.data[key] += other.data[key]
        return self

    def reduce(self) -> Dict[str, Any]:
        transfers = self.data["transfers"]
        done = [t for t in transfers if t[4]]
        seconds = sum(t[3] for t in done)
        moved = sum(t[2] for t in done)
        peers: Dict[str, List[float]] = {}
        for peer, _, nbytes, _, ok, _ in transfers:
            entry = peers.setdefault(peer[:8], [0, 0, 0])
            entry[0] += 1
            entry[1] += nbytes if ok else 0
            entry[2] += 0 if ok else 1
        return {
            "num_transfers": len(transfers),
            "num_failed": len(transfers) - len(done),
            "MB": round(moved / 2**20, 3),
            "avg_ms": round(1000 * seconds / len(done), 3) if done else 0,
            "max_ms": round(1000 * max((t[3] for t in done), default=0), 3),
            "GB/s": round(moved / seconds / 1e9, 3) if seconds else 0,
            "leases_released": self.data["leases_released"],
            "leases_expired": self.data["leases_expired"],
            "per_peer(pulls/MB/failed)": ", ".join(
                f"{peer}: {n}/{b / 2**20:.1f}/{f}" for peer, (n, b, f) in peers.items()),
        }


class TransferStats:
    """A thread-safe accumulator of one connector half, drained once per step by `take`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._data = _empty()

    def record(self, peer: str, request_id: str, nbytes: int, seconds: float, ok: bool,
               error: str = "") -> None:
        with self._lock:
            if len(self._data["transfers"]) < MAX_ENTRIES:
                self._data["transfers"].append([peer, request_id, nbytes, seconds, ok, error])

    def count_lease(self, outcome: str, count: int = 1) -> None:
        with self._lock:
            self._data[f"leases_{outcome}"] += count

    def take(self) -> Optional[LLMDataDistKVConnectorStats]:
        with self._lock:
            data, self._data = self._data, _empty()
        stats = LLMDataDistKVConnectorStats(data=data)
        return None if stats.is_empty() else stats


class PromMetrics(KVConnectorPromMetrics):
    """Prometheus series (per engine; bytes and pulls also per peer engine)."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._labels = per_engine_labelvalues
        self._seconds = create_metric_per_engine(self._histogram_cls(
            name=PREFIX + "pull_seconds", documentation="Duration of one request's KV pull "
            "(LLMDataDistConnector)", labelnames=labelnames,
            buckets=[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10]),
            per_engine_labelvalues)
        peer_labels = list(labelnames) + ["peer"]
        self._bytes = self._counter_cls(name=PREFIX + "pull_bytes", labelnames=peer_labels,
                                        documentation="KV bytes pulled from each peer engine")
        self._pulls = self._counter_cls(name=PREFIX + "pulls", labelnames=peer_labels + ["outcome"],
                                        documentation="KV pulls per peer engine and outcome")
        self._leases = self._counter_cls(name=PREFIX + "leases", labelnames=list(labelnames) + ["outcome"],
                                         documentation="Prefill leases ended (released or expired)")

    def observe(self, transfer_stats_data: Dict[str, Any], engine_idx: int = 0):
        labels = [str(v) for v in self._labels[engine_idx]]
        for peer, _, nbytes, seconds, ok, _ in transfer_stats_data.get("transfers", ()):
            self._pulls.labels(*labels, peer, "ok" if ok else "failed").inc()
            if ok:
                self._bytes.labels(*labels, peer).inc(nbytes)
                self._seconds[engine_idx].observe(seconds)
        for outcome in ("released", "expired"):
            count = transfer_stats_data.get(f"leases_{outcome}", 0)
            if count:
                self._leases.labels(*labels, outcome).inc(count)
