"""Shared fixtures: `LLMDataDist` instances (bare, v2 and v1) and a shm-leak check.

Shared helper functions are in helpers.py (tests/ is on sys.path: this file's folder).
"""
import itertools
import json

import pytest

from helpers import link_in_process, shm_files
from llm_datadist_torch import LLMConfig, LLMDataDist, LLMRole

DEVICE_POOL_BYTES = 4 << 20
HOST_POOL_BYTES = 4 << 20
PAGE_SHIFT = 12

_cluster_ids = itertools.count(1000)


def next_cluster_id() -> int:
    """A cluster id no other instance of this test session uses."""
    return next(_cluster_ids)


def pool_cfg(memory_size: int, page_shift: int = PAGE_SHIFT) -> str:
    return json.dumps({"memory_size": memory_size, "page_shift": page_shift})


@pytest.fixture
def cpu_device(monkeypatch):
    """Caches on CPU whatever accelerator the machine has (Placement.DEVICE = CPU memory)."""
    monkeypatch.setenv("LLM_DATADIST_TORCH_DEVICE", "cpu")


@pytest.fixture
def no_shm_leak():
    """After the test (and every instance finalized), no pool file of this process remains."""
    yield
    leftover = shm_files()
    assert not leftover, f"shared-memory files left behind: {leftover}"


@pytest.fixture
def instances(no_shm_leak):
    """Factory: a bare (not initialized) `LLMDataDist(role, cluster_id)`, a fresh cluster id
    unless one is given; every instance is finalized at teardown, before the shm-leak check."""
    created = []

    def make(role=LLMRole.PROMPT, cluster_id=None):
        datadist = LLMDataDist(role, next_cluster_id() if cluster_id is None else cluster_id)
        created.append(datadist)
        return datadist

    yield make
    for datadist in created:
        datadist.finalize()


def _init(datadist, config: LLMConfig, config_props: dict):
    """`datadist` initialized with `config`, after setting the `LLMConfig` properties given."""
    for name, value in config_props.items():
        setattr(config, name, value)
    datadist.init(config.generate_options())
    return datadist


@pytest.fixture
def make_datadist(instances):
    """Factory: an initialized v2 `LLMDataDist`, finalized at teardown.

    `make_datadist(mem_pool=..., host_pool=..., role=..., cluster_id=..., **config_props)`;
    a pool argument of `None` leaves that pool out; extra keywords set `LLMConfig` properties.
    """
    def factory(mem_pool=DEVICE_POOL_BYTES, host_pool=HOST_POOL_BYTES, role=LLMRole.PROMPT,
                cluster_id=None, **config_props):
        config = LLMConfig()
        config.device_id = 0
        config.enable_cache_manager = True
        if mem_pool is not None:
            config.mem_pool_cfg = pool_cfg(mem_pool)
        if host_pool is not None:
            config.host_mem_pool_cfg = pool_cfg(host_pool)
        return _init(instances(role, cluster_id), config, config_props)

    return factory


@pytest.fixture
def datadist(make_datadist):
    """One v2 instance with a 4 MiB device pool and a 4 MiB host pool (4 KiB pages)."""
    return make_datadist()


@pytest.fixture
def cache_manager(datadist):
    return datadist.cache_manager


@pytest.fixture
def make_linked_pair(make_datadist):
    """Factory: `(owner, requester)`, two v2 instances in this process, the owner listening on a
    free port of 127.0.0.1 and the requester linked to it (the local transport moves the bytes).
    Keywords set `LLMConfig` properties of both."""
    def factory(**config_props):
        owner = make_datadist(listen_ip_info="127.0.0.1:0", **config_props)
        requester = make_datadist(**config_props)
        link_in_process(requester, owner)
        return owner, requester

    return factory


@pytest.fixture
def linked_pair(make_linked_pair):
    """`(owner, requester)` of `make_linked_pair()`."""
    return make_linked_pair()


@pytest.fixture
def make_v1_datadist(instances):
    """Factory: an initialized v1 (KvCacheManager) `LLMDataDist`, DECODER, device 0."""
    def factory(role=LLMRole.DECODER, cluster_id=None, **config_props):
        config = LLMConfig()
        config.device_id = 0
        return _init(instances(role, cluster_id), config, config_props)

    return factory


@pytest.fixture
def v1_datadist(make_v1_datadist):
    return make_v1_datadist()
