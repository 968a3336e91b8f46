"""The worker half of the connector: one `LLMDataDist` per vLLM worker, vLLM's KV tensors
registered as its blocks caches, and pulls run off the forward thread.

Runs in each vLLM worker process. `register_kv_caches` starts the `LLMDataDist` (listening, so
peers can link to it) and registers vLLM's KV memory with `register_blocks_cache`; nothing is
copied, peers read that memory. `start_load_kv` hands each `RecvJob` to a thread pool:

1. the peer (prefill engine) is looked up, or met: `Hello` over its side channel gives its
   worker's cluster id, data-plane address and `Geometry`; a peer whose geometry differs is
   refused (`GeometryMismatch`); then `link_clusters`. Links are kept for later requests.
2. `pull_blocks` moves the request's blocks of every registered cache into ours;
3. `Release` tells the prefill engine this rank is done and answers whether its lease held
   throughout; if not, the blocks may have been reused under us and the load counts as failed.

Completions surface in `get_transfer_results` (finished receiving; failures also as failed
receives and through `get_block_ids_with_load_errors`, so vLLM's kv_load_failure_policy
applies). The prefill side's releases come from the scheduler as `finished_sending`.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import torch

from llm_datadist_torch import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,
                                LLMDataDist, LLMException, LLMRole, LLMStatusCode, Placement)

from .config import (LOGGER_PREFIX, ConnectorConfig, cluster_id_of, free_port,
                     local_address_towards)
from .geometry import Geometry, GeometryMismatch, check_compatible
from .kv_tensors import group_by_block_bytes, split_kv_caches
from .metadata import ConnectorMetadata, RecvJob, WorkerHandshake
from .side_channel import (Hello, HelloReply, Release, ReleaseReply, SideChannelClient,
                           SideChannelError, WorkerInfo)
from .stats import TransferStats

logger = logging.getLogger(LOGGER_PREFIX + __name__)

PeerKey = Tuple[str, str, int]  # engine id, side-channel host, side-channel port
# After a peer failed (gone, unreachable, link refused), loads from it fail at once for this
# long instead of each waiting for its own handshake deadline; then it is met again.
PEER_RETRY_S = 10.0
LINKED = (LLMStatusCode.LLM_SUCCESS, LLMStatusCode.LLM_ALREADY_LINK)
UNREACHABLE = (LLMStatusCode.LLM_LINK_FAILED, LLMStatusCode.LLM_NOT_YET_LINK)


class LoadError(RuntimeError):
    """A pull that cannot or did not deliver the request's blocks."""


@dataclass
class Peer:
    client: SideChannelClient
    cluster: LLMClusterInfo
    info: WorkerInfo
    refused: Optional[str] = None  # why every pull from this peer fails (geometry, TP size)


def _tp_rank_and_size() -> Tuple[int, int]:
    try:
        from vllm.distributed.parallel_state import (get_tensor_model_parallel_rank,
                                                     get_tensor_model_parallel_world_size)
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, ImportError):  # no distributed state (a bare test of this class)
        return 0, 1


class WorkerHalf:
    def __init__(self, vllm_config, kv_cache_config, config: ConnectorConfig, producer: bool,
                 consumer: bool):
        self._vllm_config = vllm_config
        self._kv_cache_config = kv_cache_config
        self._config = config
        self.producer, self.consumer = producer, consumer
        self.engine_id: str = vllm_config.kv_transfer_config.engine_id
        self.rank, self.tp_size = _tp_rank_and_size()
        self.cluster_id = cluster_id_of(self.engine_id, self.rank)
        self._datadist: Optional[LLMDataDist] = None
        self._caches = []
        self.geometry: Optional[Geometry] = None
        self._info: Optional[WorkerInfo] = None
        self._kv_tensors: List[torch.Tensor] = []  # keep vLLM's views alive while registered
        self._peers: Dict[PeerKey, Peer] = {}
        self._peers_lock = threading.Lock()
        self._connect_locks: Dict[PeerKey, threading.Lock] = {}
        self._failed_peers: Dict[PeerKey, Tuple[float, str]] = {}  # since when, why
        self._pool = ThreadPoolExecutor(config.pull_threads, thread_name_prefix="llmdd-vllm-pull")
        self._done = threading.Condition()
        self._in_flight = 0
        self._finished: Set[str] = set()
        self._failed: Set[str] = set()
        self._bad_blocks: Set[int] = set()
        self._stats = TransferStats()

    # ---- set-up -----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: Dict[str, torch.Tensor]) -> None:
        if len(self._kv_cache_config.kv_cache_groups) != 1:
            raise NotImplementedError("LLMDataDistConnector supports models with one KV cache "
                                      "group (no hybrid attention / Mamba layers)")
        num_blocks = self._kv_cache_config.num_blocks
        split = split_kv_caches(kv_caches, num_blocks)
        self._kv_tensors = split.tensors
        self._start_datadist(split.tensors[0].device)
        for model_id, (block_bytes, tensors) in enumerate(group_by_block_bytes(split.tensors)):
            self._caches.append(self._register(model_id, [num_blocks, block_bytes], tensors))
        self.geometry = self._geometry(kv_caches, split)
        self._info = WorkerInfo(self.cluster_id, self._config.public_host, self._port,
                                self.geometry)
        logger.info("LLMDataDistConnector worker %d: %d KV tensors (%s) registered as %d blocks "
                    "cache(s), %d blocks of %d bytes; data plane %s:%d (cluster %d)", self.rank,
                    len(split.tensors), split.layout, len(self._caches), num_blocks,
                    self.geometry.block_bytes, self._config.public_host, self._port,
                    self.cluster_id)

    def _start_datadist(self, device: torch.device) -> None:
        role = {(True, False): LLMRole.PROMPT, (False, True): LLMRole.DECODER}.get(
            (self.producer, self.consumer), LLMRole.MIX)
        host = self._config.host
        dp_index = getattr(self._vllm_config.parallel_config, "data_parallel_index", 0) or 0
        last_error = None
        for _ in range(5):  # a free port can be taken between probing and binding
            port = (self._config.base_port + dp_index * self.tp_size + self.rank
                    if self._config.base_port else free_port(host))
            options = LLMConfig()
            options.device_id = device.index or 0
            options.enable_cache_manager = True
            options.listen_ip_info = f"{host}:{port}"
            options.sync_kv_timeout = self._config.sync_kv_timeout_ms
            if self._config.transfer_backend:
                options.transfer_backend = self._config.transfer_backend
            datadist = LLMDataDist(role, self.cluster_id)
            try:
                datadist.init(options.generate_options())
            except LLMException as exc:
                last_error = exc
                if self._config.base_port:
                    break
                continue
            self._datadist, self._port = datadist, port
            return
        raise RuntimeError(f"LLMDataDistConnector: cannot listen on {host} "
                           f"(port {'base_port + rank' if self._config.base_port else 'free'}): "
                           f"{last_error}")

    def _register(self, model_id: int, shape: List[int], tensors: List[torch.Tensor]):
        manager = self._datadist.cache_manager
        key = BlocksCacheKey(self.cluster_id, model_id) if self.producer else None
        # Peers read a producer's cache. A forced transfer_backend switches the library to
        # remote-cache-accessible mode (as upstream), where even a pull's destination must be.
        remote = self.producer or bool(self._config.transfer_backend)
        addrs = [tensor.data_ptr() for tensor in tensors]
        desc = CacheDesc(len(tensors), shape, DataType.DT_UINT8, Placement.DEVICE)
        try:
            return manager.register_blocks_cache(desc, addrs, key, remote_accessible=remote)
        except LLMException as exc:
            if tensors[0].device.type != "cpu" or exc.status_code != LLMStatusCode.LLM_PARAM_INVALID:
                raise
        # vLLM's KV lives in host memory while the library's device is an accelerator.
        desc = CacheDesc(len(tensors), shape, DataType.DT_UINT8, Placement.HOST)
        return manager.register_blocks_cache(desc, addrs, key, remote_accessible=remote)

    def _geometry(self, kv_caches, split) -> Geometry:
        import vllm
        model_config = self._vllm_config.model_config
        cache_config = self._vllm_config.cache_config
        first = next(iter(kv_caches.values()))
        architectures = getattr(model_config, "architectures", None) or ["?"]
        return Geometry(
            vllm_version=vllm.__version__, architecture=str(architectures[0]),
            num_layers=len(kv_caches), block_size=cache_config.block_size,
            dtype=str(first.dtype), cache_dtype=str(cache_config.cache_dtype),
            layout=f"{split.layout}/{getattr(cache_config, 'kv_cache_layout', None) or '-'}",
            tensor_block_shapes=split.block_shapes,
            tensor_block_bytes=[int(t.shape[1]) for t in split.tensors],
            num_kv_heads=model_config.get_num_kv_heads(self._vllm_config.parallel_config),
            head_size=model_config.get_head_size(), tp_size=self.tp_size, tp_rank=self.rank)

    def handshake(self) -> Optional[WorkerHandshake]:
        return WorkerHandshake(self._info) if self._info is not None and self.producer else None

    # ---- pulls ------------------------------------------------------------------------------
    def start_load_kv(self, metadata: ConnectorMetadata) -> None:
        for job in metadata.recv:
            with self._done:
                self._in_flight += 1
            self._pool.submit(self._pull, job)

    def _pull(self, job: RecvJob) -> None:
        key: PeerKey = (job.remote_engine_id, job.remote_host, job.remote_port)
        nbytes = len(job.local_block_ids) * self.geometry.block_bytes
        started = time.perf_counter()
        ok, error, released = False, "", False
        try:
            if len(job.remote_block_ids) != len(job.local_block_ids):
                raise LoadError(f"the prefill engine holds {len(job.remote_block_ids)} blocks "
                                f"for this prompt, {len(job.local_block_ids)} are needed")
            peer = self._peer(key, job.remote_tp_size)
            met = time.perf_counter()
            manager = self._datadist.cache_manager
            for model_id, cache in enumerate(self._caches):
                manager.pull_blocks(BlocksCacheKey(peer.info.cluster_id, model_id), cache,
                                    src_blocks=job.remote_block_ids,
                                    dst_blocks=job.local_block_ids)
            pulled = time.perf_counter()
            released = True
            reply = peer.client.call(Release(job.remote_request_id, job.lease_token, self.rank))
            if not (isinstance(reply, ReleaseReply) and reply.intact):
                raise LoadError("the prefill engine's lease on these blocks ended before the "
                                "pull finished (they may have been reused)")
            ok = True
            logger.debug("pulled request %s: %d blocks, %d bytes; peer %.2f ms, pull %.2f ms, "
                         "release %.2f ms", job.request_id, len(job.local_block_ids), nbytes,
                         (met - started) * 1e3, (pulled - met) * 1e3,
                         (time.perf_counter() - pulled) * 1e3)
        except (LoadError, GeometryMismatch) as exc:
            error = str(exc)
        except (LLMException, SideChannelError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            # Unreachable or gone: fail fast for a while. Anything else (a transfer timeout
            # breaks the link, for one): link again at the next request.
            gone = not isinstance(exc, LLMException) or exc.status_code in UNREACHABLE
            self._drop_peer(key, error if gone else None)
        except Exception as exc:  # never lose a completion: vLLM would wait for it forever
            logger.exception("LLMDataDistConnector: pull of request %s failed", job.request_id)
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        self._stats.record(job.remote_engine_id, job.request_id, nbytes, seconds, ok, error)
        if not ok:
            logger.warning("LLMDataDistConnector: loading request %s's KV (%d blocks) from "
                           "engine %s at %s:%d failed: %s", job.request_id,
                           len(job.local_block_ids), job.remote_engine_id, job.remote_host,
                           job.remote_port, error)
        with self._done:
            self._in_flight -= 1
            self._finished.add(job.request_id)
            if not ok:
                self._failed.add(job.request_id)
                self._bad_blocks.update(job.local_block_ids)
            self._done.notify_all()
        if not ok and not released:
            self._release_quietly(key, job)

    def _release_quietly(self, key: PeerKey, job: RecvJob) -> None:
        """Free the prefill side's blocks early after a failed pull (the lease would anyway),
        unless the prefill engine is known unreachable: then a pull thread would wait for it."""
        with self._peers_lock:
            if key in self._failed_peers:
                return
            peer = self._peers.get(key)
        client = peer.client if peer is not None else None
        try:
            if client is None:
                client = SideChannelClient(job.remote_host, job.remote_port, 1.0)
                try:
                    client.call(Release(job.remote_request_id, job.lease_token, self.rank))
                finally:
                    client.close()
            else:
                client.call(Release(job.remote_request_id, job.lease_token, self.rank), 1.0)
        except (SideChannelError, OSError):
            pass

    def _peer(self, key: PeerKey, remote_tp_size: int) -> Peer:
        with self._peers_lock:
            lock = self._connect_locks.setdefault(key, threading.Lock())
        with lock:  # one handshake per peer, whatever the number of pulls waiting for it
            with self._peers_lock:
                peer = self._peers.get(key)
            if peer is None:
                with self._peers_lock:
                    failed = self._failed_peers.get(key)
                if failed is not None and time.monotonic() - failed[0] < PEER_RETRY_S:
                    raise LoadError(f"this engine failed {time.monotonic() - failed[0]:.1f} s "
                                    f"ago ({failed[1]}); next try after {PEER_RETRY_S:.0f} s")
                try:
                    peer = self._meet(key, remote_tp_size)
                except Exception as exc:
                    self._mark_failed(key, f"{type(exc).__name__}: {exc}")
                    raise
                with self._peers_lock:
                    self._peers[key] = peer
                    self._failed_peers.pop(key, None)
        if peer.refused:
            raise GeometryMismatch(peer.refused)
        return peer

    def _meet(self, key: PeerKey, remote_tp_size: int) -> Peer:
        engine_id, host, port = key
        client = SideChannelClient(host, port, self._config.rpc_timeout_s)
        try:
            reply = client.call(Hello(self.rank))
            if not isinstance(reply, HelloReply):
                raise SideChannelError(f"{host}:{port}: unexpected answer to Hello: {reply!r}")
            peer = Peer(client, LLMClusterInfo(), reply.worker)
            where = f"engine {reply.engine_id} at {host}:{port}"
            if reply.engine_id != engine_id:
                raise LoadError(f"{host}:{port} is engine {reply.engine_id}, not {engine_id} "
                                f"(restarted?)")
            if reply.tp_size != self.tp_size or remote_tp_size != self.tp_size:
                peer.refused = (f"LLMDataDistConnector refuses peer {where}: tensor-parallel "
                                f"size {reply.tp_size}, ours {self.tp_size} (must be equal)")
            else:
                try:
                    check_compatible(self.geometry, reply.worker.geometry, where)
                except GeometryMismatch as exc:
                    peer.refused = str(exc)
            if peer.refused:
                logger.error("%s", peer.refused)
                return peer
            self._link(peer)
            return peer
        except BaseException:
            client.close()
            raise

    def _link(self, peer: Peer) -> None:
        info, cluster = peer.info, peer.cluster
        cluster.remote_cluster_id = info.cluster_id
        cluster.append_local_ip_info(local_address_towards(info.host), 0)
        cluster.append_remote_ip_info(info.host, info.port)
        status, per_cluster = self._datadist.link_clusters([cluster], self._config.link_timeout_ms)
        result = per_cluster[0] if per_cluster else status
        if result not in LINKED:
            raise LoadError(f"link_clusters to cluster {info.cluster_id} at {info.host}:"
                            f"{info.port} failed: {result}")

    def _mark_failed(self, key: PeerKey, error: str) -> None:
        now = time.monotonic()
        with self._peers_lock:
            for old in [k for k, (since, _) in self._failed_peers.items()
                        if now - since >= PEER_RETRY_S]:
                del self._failed_peers[old]
            self._failed_peers[key] = (now, error)

    def _drop_peer(self, key: PeerKey, error: Optional[str] = None) -> None:
        """Forget a peer after a failure: after PEER_RETRY_S, a request meets (links) it again."""
        if error is not None:
            self._mark_failed(key, error)
        with self._peers_lock:
            peer = self._peers.pop(key, None)
        if peer is None:
            return
        peer.client.close()
        if peer.cluster.remote_cluster_id and not peer.refused:
            try:
                self._datadist.unlink_clusters([peer.cluster], self._config.link_timeout_ms,
                                               force=True)
            except LLMException as exc:
                logger.debug("unlink after a failed pull: %s", exc)

    # ---- per-step reports -------------------------------------------------------------------
    def transfer_results(self, metadata: Optional[ConnectorMetadata]):
        """(finished sending, finished receiving, failed receiving) of this step."""
        with self._done:
            if (metadata is not None and metadata.idle and self._in_flight
                    and not self._finished and self._config.idle_wait_ms):
                self._done.wait(self._config.idle_wait_ms / 1000)
            finished, self._finished = self._finished, set()
            failed, self._failed = self._failed, set()
        sending = set(metadata.finished_sending) if metadata is not None else set()
        return sending, finished, failed

    def load_errors(self) -> Set[int]:
        with self._done:
            bad, self._bad_blocks = self._bad_blocks, set()
        return bad

    def stats(self):
        return self._stats.take()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._peers_lock:
            keys = list(self._peers)
        for key in keys:
            self._drop_peer(key)
        if self._datadist is not None:
            self._datadist.finalize()
            self._datadist = None
