"""Failure paths leave nothing behind and report statuses: failed inits, bad options, bad link
arguments, many calls at once on one link."""
import os
import socket
import threading

import pytest
import torch

from helpers import cluster_info, link_in_process, shm_files
from llm_datadist_torch import (CacheDesc, CacheKey, DataType, LLMConfig, LLMException,
                                LLMStatusCode, Placement)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thirty_failed_inits_leave_no_thread_socket_or_file(instances):
    """init on a port that is taken fails, and leaves no thread, fd or /dev/shm file."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = LLMConfig()
        config.device_id = 0
        config.enable_cache_manager = True
        config.listen_ip_info = f"127.0.0.1:{taken.getsockname()[1]}"
        config.mem_pool_cfg = '{"memory_size": 1048576}'
        options = config.generate_options()

        def fail_once():
            with pytest.raises(LLMException):
                instances().init(options)

        fail_once()  # the first one may create process-wide singletons (zmq context)
        threads, fds = threading.active_count(), _fds()
        for _ in range(30):
            fail_once()
        assert threading.active_count() == threads
        assert _fds() - fds < 5  # zmq closes sockets in its own thread; a leak would be >= 30
        assert shm_files() == []


@pytest.mark.parametrize("value", [1, None, 1.5, b"1", ["1"]])
def test_every_option_of_the_wrong_type_is_a_type_error(instances, value):
    for name in ("llm.EnableCacheManager", "ge.exec.deviceId", "llm.SyncKvCacheWaitTime",
                 "llm.listenIpInfo", "llm.MemPoolConfig"):
        with pytest.raises(TypeError):
            instances().init({"llm.EnableCacheManager": "1", name: value})
    with pytest.raises(TypeError):
        instances().init({1: "1"})


@pytest.mark.parametrize("local_ip", [None, 2**40, -1])
def test_link_clusters_returns_a_status_for_every_bad_address_it_accepts(make_datadist, local_ip):
    owner = make_datadist(listen_ip_info="127.0.0.1:0")
    client = make_datadist()
    port = int(owner._links.listening.rsplit(":", 1)[1])
    info = cluster_info(owner.cluster_id)
    try:
        info.append_local_ip_info(local_ip, 0)
    except (TypeError, ValueError, RuntimeError):
        return  # refused by LLMClusterInfo itself, as upstream
    info.append_remote_ip_info("127.0.0.1", port)
    overall, per_cluster = client.link_clusters([info], 2000)
    assert isinstance(overall, LLMStatusCode) and len(per_cluster) == 1
    assert all(isinstance(code, LLMStatusCode) for code in per_cluster)


def test_more_concurrent_calls_than_the_pipeline_holds_all_succeed(make_datadist):
    """17 threads pulling by request key over one link at once (every pull is a round trip
    to the owner, and a release): back-pressure waits, nobody times out, the link stays
    usable, every byte arrives."""
    threads_n, pulls = 17, 4
    shape = [threads_n * pulls, 256]
    owner = make_datadist(listen_ip_info="127.0.0.1:0")
    puller = make_datadist()
    link_in_process(puller, owner)
    keys = [CacheKey(owner.cluster_id, req_id=slot) for slot in range(shape[0])]
    source = owner.cache_manager.allocate_cache(CacheDesc(2, shape, DataType.DT_INT32,
                                                          Placement.HOST), keys)
    for index, tensor in enumerate(source.tensors):
        tensor.copy_(torch.arange(tensor.numel(), dtype=torch.int32).view(shape) * (index + 1))
    caches = [puller.cache_manager.allocate_cache(CacheDesc(2, [pulls, 256], DataType.DT_INT32,
                                                            Placement.DEVICE))
              for _ in range(threads_n)]
    errors = []
    start = threading.Barrier(threads_n)

    def pull(thread_index):
        start.wait()
        try:
            for k in range(pulls):
                puller.cache_manager.pull_cache(keys[thread_index * pulls + k],
                                                caches[thread_index], k)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(repr(exc))

    workers = [threading.Thread(target=pull, args=(i,)) for i in range(threads_n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert errors == []
    for i, cache in enumerate(caches):
        for mine, theirs in zip(cache.tensors, source.tensors):
            assert torch.equal(mine, theirs[i * pulls:(i + 1) * pulls])
    assert not puller._links.get(owner.cluster_id).broken


# ---- authentication with a shared key --------------------------------------------------------
KEY_OPTION = "llm_datadist_torch.AuthKey"


@pytest.mark.parametrize("owner_key, puller_key, linked", [
    ("s3cret", "s3cret", True), ("s3cret", "other", False), ("s3cret", None, False),
    (None, "s3cret", False)])
def test_links_authenticate_with_the_shared_key(instances, owner_key, puller_key, linked):
    """Both sides hold the key: the link works. Otherwise it is refused with LLM_LINK_FAILED,
    and the owner serves nothing to the peer it could not authenticate."""
    def start(key, listen):
        options = {"llm.EnableCacheManager": "1", "ge.exec.deviceId": "0",
                   "llm.MemPoolConfig": '{"memory_size": 1048576}'}
        if listen:
            options["llm.listenIpInfo"] = "127.0.0.1:0"
        if key is not None:
            options[KEY_OPTION] = key
        datadist = instances()
        datadist.init(options)
        return datadist

    owner, puller = start(owner_key, True), start(puller_key, False)
    port = int(owner._links.listening.rsplit(":", 1)[1])
    overall, _ = puller.link_clusters([cluster_info(owner.cluster_id, port)], 3000)
    if linked:
        assert overall == LLMStatusCode.LLM_SUCCESS
        assert owner._links.get(puller.cluster_id).authenticated
        return
    assert overall == LLMStatusCode.LLM_LINK_FAILED
    assert puller._links.linked_ids() == []
    for link in owner._links.all_links():  # whatever the owner still holds serves nothing
        assert not link.authenticated or owner_key is None
