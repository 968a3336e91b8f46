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

from ._checks import check_isinstance, check_uint64
from ._engine import Engine
from ._options import parse_options
from .cache_manager import CacheManager
from .enums import LLMRole, role_to_engine_string
from .kv_cache_manager import KvCacheManager
from .status import LLMException, LLMStatusCode, raise_if_false

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
            self._engine = engine
            if options.cache_manager_mode:
                self._cache_manager = CacheManager(engine)
            else:
                self._kv_cache_manager = KvCacheManager(engine)
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
            engine.close()
            self._engine = None
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


@atexit.register
def _finalize_at_exit() -> None:
    for instance in list(_live_instances):
        try:
            instance.finalize()
        except LLMException as exc:
            logger.warning("finalize at exit of cluster %d failed: %s", instance.cluster_id, exc)
