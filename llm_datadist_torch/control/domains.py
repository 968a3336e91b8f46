"""Two-sided links: `link(comm_name, cluster_rank_info, rank_table)` (spec §8.8, §26.24).

Every member calls `link` with the same arguments. Each rank serves on its rank endpoint: the
rank table entry's `device_ip` (else its server's `host_ip` / `server_id`) and the entry's
optional `"device_port"`, else `LLM_DATADIST_TORCH_LINK_BASE_PORT` (default 27000) + rank id.
The higher rank of every pair connects to the lower one, in the background, retrying until the
deadline; `query_register_mem_status` reports PREPARING until every pair is linked, then OK, or
FAILED once the deadline (`link_total_time`, default 120 s) has passed.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import threading
import time
from typing import Dict, Optional

from .links import LinkManager, endpoint
from ..enums import RegisterMemStatus
from ..status import LLMStatusCode, fail, raise_if_false

logger = logging.getLogger(__name__)

BASE_PORT_ENV = "LLM_DATADIST_TORCH_LINK_BASE_PORT"
DEFAULT_BASE_PORT = 27000
DEFAULT_LINK_TIME_S = 120
MAX_DOMAINS = 512
RETRY_INTERVAL_S = 0.05


def rank_endpoints(rank_table: str) -> Dict[int, str]:
    """rank id -> tcp endpoint, from an HCCL rank table (JSON)."""
    try:
        table = json.loads(rank_table)
    except ValueError:
        fail(LLMStatusCode.LLM_PARAM_INVALID, "rank_table is not valid JSON")
    base_port = int(os.environ.get(BASE_PORT_ENV, DEFAULT_BASE_PORT))
    endpoints = {}
    try:
        for server in table["server_list"]:
            host = server.get("host_ip") or server.get("server_ip") or server.get("server_id")
            for device in server["device"]:
                rank = int(device["rank_id"])
                ip = device.get("device_ip") or host
                port = int(device.get("device_port", base_port + rank))
                endpoints[rank] = endpoint(ip, port)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        fail(LLMStatusCode.LLM_PARAM_INVALID, "rank_table has no usable server_list/device entries: %s", exc)
    return endpoints


@dataclasses.dataclass(eq=False)
class Domain:
    members: Dict[int, str]  # cluster id -> endpoint of its rank
    own_endpoint: str
    deadline: float
    failed: bool = False
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    thread: Optional[threading.Thread] = None


class CommDomains:
    def __init__(self, links: LinkManager, cluster_id: int, link_total_time_s: int):
        self._links = links
        self._cluster_id = cluster_id
        self._link_time_s = link_total_time_s or DEFAULT_LINK_TIME_S
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._domains: Dict[int, Domain] = {}

    def link(self, cluster_rank_info: Dict[int, int], rank_table: str) -> int:
        raise_if_false(self._cluster_id in cluster_rank_info,
                       "cluster_rank_info does not contain this cluster (%d)", self._cluster_id)
        with self._lock:
            raise_if_false(len(self._domains) < MAX_DOMAINS, "at most %d communication domains", MAX_DOMAINS)
        endpoints = rank_endpoints(rank_table)
        missing = [rank for rank in cluster_rank_info.values() if rank not in endpoints]
        raise_if_false(not missing, "rank_table has no device entry for rank(s) %s", missing)
        members = {cid: endpoints[rank] for cid, rank in cluster_rank_info.items()}
        own_rank = cluster_rank_info[self._cluster_id]
        domain = Domain(members, members[self._cluster_id], time.monotonic() + self._link_time_s)
        try:
            self._links.bind_extra(domain.own_endpoint)
        except Exception as exc:  # the rank endpoint is taken or not ours
            fail(LLMStatusCode.LLM_LINK_FAILED, "cannot serve rank %d on %s: %s", own_rank,
                 domain.own_endpoint, exc)
        lower = {cid: members[cid] for cid, rank in cluster_rank_info.items() if rank < own_rank}
        domain.thread = threading.Thread(target=self._connect_all, args=(domain, lower), daemon=True,
                                         name=f"llm_datadist_torch-link-{self._cluster_id}")
        with self._lock:
            comm_id = next(self._ids)
            self._domains[comm_id] = domain
        domain.thread.start()
        return comm_id

    def _connect_all(self, domain: Domain, lower: Dict[int, str]) -> None:
        pending = dict(lower)
        while pending and not domain.stop.is_set():
            for cid, address in list(pending.items()):
                remaining = domain.deadline - time.monotonic()
                if remaining <= 0:
                    logger.error("link(): ranks %s never answered", sorted(pending))
                    domain.failed = True
                    return
                if self._links.connect(address, min(remaining, 1.0)) == LLMStatusCode.LLM_SUCCESS:
                    del pending[cid]
            domain.stop.wait(RETRY_INTERVAL_S if pending else 0)

    def _domain(self, comm_id: int) -> Domain:
        with self._lock:
            domain = self._domains.get(comm_id)
        if domain is None:
            fail(LLMStatusCode.LLM_NOT_YET_LINK, "no communication domain with comm_id %d", comm_id)
        return domain

    def status(self, comm_id: int) -> RegisterMemStatus:
        domain = self._domain(comm_id)
        linked = set(self._links.linked_ids())
        if all(cid in linked for cid in domain.members if cid != self._cluster_id):
            return RegisterMemStatus.OK
        if domain.failed or time.monotonic() > domain.deadline:
            return RegisterMemStatus.FAILED
        return RegisterMemStatus.PREPARING

    def unlink(self, comm_id: int, notify_timeout_s: float = 1.0) -> None:
        domain = self._domain(comm_id)
        with self._lock:
            self._domains.pop(comm_id, None)
        self._stop(domain)
        for cid in domain.members:
            if cid != self._cluster_id:
                self._links.drop(cid, notify_timeout_s)
        self._links.unbind_extra(domain.own_endpoint)

    def close(self) -> None:
        with self._lock:
            domains, self._domains = list(self._domains.values()), {}
        for domain in domains:
            self._stop(domain)

    @staticmethod
    def _stop(domain: Domain) -> None:
        domain.stop.set()
        if domain.thread is not None:
            domain.thread.join(timeout=5)
