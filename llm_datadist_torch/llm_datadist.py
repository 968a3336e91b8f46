"""`LLMDataDist`: one cluster (spec §8) - lifecycle, manager accessors, links.

Several instances may be initialized in one process (a prompt and a decoder side by side, as
tests and single-process demos do); upstream allows one. Every initialized instance is
finalized at interpreter exit if the application did not do it.
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref

from typing import Dict, List, Optional, Tuple

from ._checks import check_int32, check_isinstance, check_uint32, check_uint64
from .control.domains import CommDomains
from .core.engine import Engine
from .control.links import LinkManager
from .core.options import parse_listen, parse_options
from .cache_manager import CacheManager
from .configs import LLMClusterInfo
from .enums import LLMRole, RegisterMemStatus, role_to_engine_string
from .kv_cache_manager import KvCacheManager
from .status import LLMException, LLMStatusCode, fail, raise_if_false

PARAM = LLMStatusCode.LLM_PARAM_INVALID
MAX_COMM_NAME = 127
MAX_DOMAIN_MEMBERS = 4

logger = logging.getLogger(__name__)

_live_instances: "weakref.WeakSet[LLMDataDist]" = weakref.WeakSet()


class LLMDataDist:
    llm_engine_instance = None  # the most recently initialized instance (upstream attribute)

    def __init__(self, role: LLMRole, cluster_id: int):
        check_isinstance("role", role, LLMRole)
        check_uint64("cluster_id", cluster_id)
        self._role = role
        self._cluster_id = cluster_id
        self._lock = threading.RLock()
        self._engine = None
        self._links = None
        self._domains = None
        self._cache_manager = None
        self._kv_cache_manager = None

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    def _require_init(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise RuntimeError("llm datadist is not initialized")
        return engine

    # ---- lifecycle -------------------------------------------------------------------------
    def init(self, options) -> None:
        with self._lock:
            if self._engine is not None:
                return
            options = parse_options(role_to_engine_string(self._role), options)
            engine = Engine(self._cluster_id, options)
            try:
                links = LinkManager(engine)
            except BaseException:
                engine.close()
                raise
            self._engine, self._links = engine, links
            self._domains = CommDomains(links, self._cluster_id, options.link_total_time_s)
            if options.cache_manager_mode:
                self._cache_manager = CacheManager(engine, links=links)
            else:
                self._kv_cache_manager = KvCacheManager(engine, links)
            LLMDataDist.llm_engine_instance = self
            _live_instances.add(self)
            logger.info("cluster %d initialized as %s on %s (%s mode)", self._cluster_id,
                        self._role.name, engine.device, "v2" if options.cache_manager_mode else "v1")

    def finalize(self) -> None:
        """Release everything; idempotent; the instance may be `init`-ed again afterwards."""
        with self._lock:
            engine = self._engine
            if engine is None:
                return
            self._domains.close()
            self._links.close()
            engine.close()
            self._engine = self._links = self._domains = None
            self._cache_manager = None
            self._kv_cache_manager = None
            _live_instances.discard(self)
            if LLMDataDist.llm_engine_instance is self:
                LLMDataDist.llm_engine_instance = None
            logger.info("cluster %d finalized", self._cluster_id)

    # ---- managers --------------------------------------------------------------------------
    @property
    def cache_manager(self) -> CacheManager:
        self._require_init()
        raise_if_false(self._cache_manager is not None,
                       "cache_manager needs llm.EnableCacheManager=1; use kv_cache_manager")
        return self._cache_manager

    @property
    def kv_cache_manager(self) -> KvCacheManager:
        self._require_init()
        raise_if_false(self._kv_cache_manager is not None,
                       "kv_cache_manager is the v1 API; with llm.EnableCacheManager=1 use cache_manager")
        return self._kv_cache_manager


    # ---- one-sided links (spec §8.5-8.7) ----------------------------------------------------
    def _check_clusters(self, clusters, timeout: int) -> None:
        check_int32("timeout", timeout)
        raise_if_false(timeout > 0, "timeout must be > 0, got %d", timeout)
        check_isinstance("clusters", clusters, (list, tuple), LLMClusterInfo)

    def link_clusters(self, clusters: List[LLMClusterInfo], timeout: int = 3000
                      ) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        """Link with servers; failures come back as status codes, never as exceptions."""
        engine = self._require_init()
        self._check_clusters(clusters, timeout)
        for cluster in clusters:
            if engine.options.cache_manager_mode and not engine.options.local_comm_res:
                raise_if_false(len(cluster.local_ip_info_list) > 0,
                               "local_ip_info_list is empty: call append_local_ip_info")
            check_uint64("remote_cluster_id", cluster.remote_cluster_id)
        return self._links.link_clusters(list(clusters), timeout)

    def unlink_clusters(self, clusters: List[LLMClusterInfo], timeout: int = 3000, force: bool = False
                        ) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        self._require_init()
        self._check_clusters(clusters, timeout)
        check_isinstance("force", force, bool)
        for cluster in clusters:
            check_uint64("remote_cluster_id", cluster.remote_cluster_id)
        return self._links.unlink_clusters(list(clusters), timeout, bool(force))

    def switch_role(self, role: LLMRole, switch_options: Optional[Dict[str, str]] = None) -> None:
        """Change role; listen options start, move or stop the listener (spec §8.7, §21.1)."""
        engine = self._require_init()
        check_isinstance("role", role, LLMRole)
        check_isinstance("switch_options", switch_options, dict)
        options = switch_options or {}
        listen = parse_listen(options["llm.listenIpInfo"]) if "llm.listenIpInfo" in options else None
        role_to_engine_string(role)  # a None role fails here, as upstream (KeyError)
        if not engine.options.cache_manager_mode:
            raise_if_false(engine.options.enable_switch_role, "switch_role needs enable_switch_role",
                           status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
            raise_if_false(role != self._role, "already in role %s", role)
            raise_if_false(role != LLMRole.PROMPT or listen is not None,
                           "switching to PROMPT needs llm.listenIpInfo")
        if engine.options.transfer_backend == "hixl":
            raise_if_false(listen is None or listen == engine.options.listen,
                           "the listen endpoint cannot change with transfer_backend hixl",
                           status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
        else:
            raise_if_false(not self._links.has_links(), "unlink every cluster before switch_role",
                           status_code=LLMStatusCode.LLM_EXIST_LINK)
            if listen is not None:
                self._links.listen(*listen)
            else:
                self._links.stop_listening()
        self._role = role

    def check_link_status(self, remote_cluster_id: int) -> None:
        """v1: raise unless linked with `remote_cluster_id`."""
        engine = self._require_init()
        raise_if_false(not engine.options.cache_manager_mode, "check_link_status is a v1 API")
        check_uint64("remote_cluster_id", remote_cluster_id)
        self._links.get(remote_cluster_id)

    # ---- two-sided links (spec §8.8) -------------------------------------------------------
    def _require_v2(self) -> Engine:
        engine = self._require_init()
        raise_if_false(engine.options.cache_manager_mode, "link() needs llm.EnableCacheManager=1")
        if engine.options.transfer_backend == "hixl":
            fail(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "link() is not available with transfer_backend hixl")
        return engine

    def link(self, comm_name: str, cluster_rank_info: Dict[int, int], rank_table: str) -> int:
        self._require_v2()
        check_isinstance("comm_name", comm_name, str, allow_none=False)
        raise_if_false(len(comm_name) > 0, "comm_name must not be empty")
        raise_if_false(len(comm_name) <= MAX_COMM_NAME, "comm_name longer than %d characters", MAX_COMM_NAME)
        check_isinstance("cluster_rank_info", cluster_rank_info, dict)
        raise_if_false(len(cluster_rank_info) <= MAX_DOMAIN_MEMBERS, "at most %d clusters per link()",
                       MAX_DOMAIN_MEMBERS)
        for cluster_id, rank in cluster_rank_info.items():
            check_uint64("cluster_rank_info key", cluster_id)
            check_uint32("cluster_rank_info value", rank)
        check_isinstance("rank_table", rank_table, str)
        raise_if_false(len(cluster_rank_info) > 1, "link() needs at least two clusters")
        ranks = list(cluster_rank_info.values())
        raise_if_false(ranks == sorted(ranks), "cluster_rank_info must list ranks in ascending order")
        comm_id = self._domains.link(cluster_rank_info, rank_table)
        self._cache_manager.linked_via_link = True
        return comm_id

    def unlink(self, comm_id: int) -> None:
        self._require_v2()
        if isinstance(comm_id, bool) or not isinstance(comm_id, int):
            raise TypeError(f"comm_id only support int, but got {type(comm_id).__name__}")
        check_uint64("comm_id", comm_id)
        self._domains.unlink(comm_id)

    def query_register_mem_status(self, comm_id: int) -> RegisterMemStatus:
        self._require_v2()
        if isinstance(comm_id, bool) or not isinstance(comm_id, int):
            raise TypeError(f"comm_id only support int, but got {type(comm_id).__name__}")
        check_uint64("comm_id", comm_id)
        return self._domains.status(comm_id)


@atexit.register
def _finalize_at_exit() -> None:
    for instance in list(_live_instances):
        try:
            instance.finalize()
        except LLMException as exc:
            logger.warning("finalize at exit of cluster %d failed: %s", instance.cluster_id, exc)
