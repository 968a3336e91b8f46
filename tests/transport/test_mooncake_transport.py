"""The `mooncake` transport: segment merging, error mapping and bounded waits (with a fake agent,
no Mooncake needed), refusal of device memory, the missing-package path, and, where Mooncake is
installed, two clusters in this process on "different hosts" that pick mooncake by themselves.
Two processes and two network namespaces: tests/integration/test_mooncake.py.
"""
import os
import sys
import threading
import time
import types

import pytest
import torch

import llm_datadist_torch.control.links as links_module
from helpers import cluster_info, i64, mooncake_missing, raises_llm
from llm_datadist_torch.control.host import free_port
from llm_datadist_torch.core.descriptors import Region
from llm_datadist_torch import (BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist,
                                LLMRole, Placement)
from llm_datadist_torch.transport.mooncake import agent as mooncake_agent
from llm_datadist_torch.status import LLMStatusCode
from llm_datadist_torch.transport import (TRANSPORTS, MooncakeTransport, Peer,
                                          TransferItem, choose_transport)
from llm_datadist_torch.transport.mooncake.transport import coalesce


# ---- segment merging ----------------------------------------------------------------------------
def test_coalesce_merges_runs_adjacent_on_both_sides():
    local, remote, lengths = coalesce(i64([0, 10, 20, 100, 50]), i64([1000, 1010, 1020, 1030, 0]),
                                      i64([10, 10, 10, 5, 7]))
    assert local.tolist() == [0, 100, 50]       # 100 is not after 20+10 locally: a new run
    assert remote.tolist() == [1000, 1030, 0]
    assert lengths.tolist() == [30, 5, 7]


def test_coalesce_drops_empty_segments_and_keeps_singletons():
    local, remote, lengths = coalesce(i64([0, 5, 5]), i64([0, 5, 9]), i64([5, 0, 3]))
    assert (local.tolist(), remote.tolist(), lengths.tolist()) == ([0, 5], [0, 9], [5, 3])
    assert coalesce(i64([]), i64([]), i64([]))[2].numel() == 0


# ---- a fake agent: what the transport asks of Mooncake and how it maps the answers --------------
class FakeAgent:
    def __init__(self, result=0, delay_s=0.0, error=None):
        self.result, self.delay_s, self.error = result, delay_s, error
        self.calls = []

    def start_call(self, target, local, remote, lengths, to_remote):
        self.calls.append((target, local, remote, lengths, to_remote))

        def run():
            time.sleep(self.delay_s)
            if self.error is not None:
                raise self.error
            return self.result
        call = mooncake_agent.InFlight(run, sum(lengths), 30.0)
        call.start()
        return call


def _transport(agent):
    return MooncakeTransport(Peer(4321, False, False, mooncake_endpoint="10.0.0.2:1234",
                                  mooncake_agent=agent))


def _item(region_address=0x10000, blocks=4, block=4096):
    local = torch.zeros(blocks * block, dtype=torch.uint8)
    offsets = i64([i * block for i in range(blocks)])
    region = Region(region_address, blocks * block)
    return TransferItem(region, offsets, local, offsets.clone(), i64([block] * blocks))


def test_one_merged_batch_per_transfer():
    agent = FakeAgent()
    transport = _transport(agent)
    first, second = _item(0x10000), _item(0x90000)
    assert transport.read([first, second], 5.0) == 2 * 4 * 4096
    assert len(agent.calls) == 1
    target, local, remote, lengths, to_remote = agent.calls[0]
    assert target == "10.0.0.2:1234" and not to_remote
    assert remote == [0x10000, 0x90000] and lengths == [4 * 4096] * 2
    assert local == [first.local.data_ptr(), second.local.data_ptr()]
    transport.write([first], 5.0)
    assert agent.calls[-1][4] is True


@pytest.mark.parametrize("agent,code", [
    (FakeAgent(result=-1), LLMStatusCode.LLM_LINK_FAILED),
    (FakeAgent(error=RuntimeError("boom")), LLMStatusCode.LLM_FAILED),
])
def test_failures_map_to_status_codes(agent, code):
    with raises_llm(code) as excinfo:
        _transport(agent).read([_item()], 5.0)
    assert "10.0.0.2:1234" in str(excinfo.value)


def test_a_stuck_call_times_out_within_the_deadline():
    agent = FakeAgent(delay_s=1.5)
    with raises_llm(LLMStatusCode.LLM_TIMEOUT, within_s=1.0) as excinfo:
        _transport(agent).read([_item()], 0.2)
    call = excinfo.value.in_flight  # handed to the caller, which keeps its memory until done
    done = threading.Event()
    call.add_done_callback(done.set)
    assert done.wait(5) and call.rc == 0


def test_device_memory_is_refused():
    agent = FakeAgent()
    item = _item()
    device_item = TransferItem(Region(0x10000, item.local.numel(), "cuda:0"),
                               item.remote_offsets, item.local, item.local_offsets, item.lengths)
    with raises_llm(LLMStatusCode.LLM_FEATURE_NOT_ENABLED) as excinfo:
        _transport(agent).read([device_item], 5.0)
    assert "CPU memory only" in str(excinfo.value)
    assert not agent.calls


def test_selection():
    region = Region(0x10000, 4096)
    far = Peer(4321, False, False, mooncake_endpoint="10.0.0.2:1", mooncake_agent=FakeAgent())
    assert choose_transport(far, region) is MooncakeTransport
    near = Peer(4321, False, True, mooncake_endpoint="127.0.0.1:1", mooncake_agent=FakeAgent())
    assert choose_transport(near, region) is TRANSPORTS["cma"]        # same host: cma first
    assert choose_transport(near, region, "mooncake") is MooncakeTransport
    with raises_llm(LLMStatusCode.LLM_FEATURE_NOT_ENABLED):          # no agent on the far end
        choose_transport(Peer(4321, False, False), region, "mooncake")


# ---- clusters in this process -----------------------------------------------------------------
def _options(listen=None, backend=None):
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    config.mem_pool_cfg = '{"memory_size": 8388608}'
    config.sync_kv_timeout = 5000
    if listen:
        config.listen_ip_info = listen
    if backend:
        config.transfer_backend = backend
    return config.generate_options()


@pytest.fixture
def clusters(monkeypatch, cpu_device):
    """`make(role, cluster_id, host=..., listen=..., backend=...)`: initialized in this process,
    each with the host identity it is given; finalized at teardown."""
    made = []

    def make(role, cluster_id, host, listen=None, backend=None):
        monkeypatch.setattr(links_module, "local_host_id", lambda: host)
        datadist = LLMDataDist(role, cluster_id)
        made.append(datadist)
        datadist.init(_options(listen, backend))
        return datadist
    yield make
    for datadist in made:
        datadist.finalize()


def _link(decoder, prompt_id, port):
    return decoder.link_clusters([cluster_info(prompt_id, port)], 5000)


@pytest.fixture
def no_mooncake(monkeypatch):
    """As if Mooncake were not installed (and no engine of an earlier test were idle)."""
    monkeypatch.setitem(sys.modules, "mooncake", None)
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)
    monkeypatch.setattr(mooncake_agent, "_idle", {})


def test_missing_package_names_the_install(no_mooncake):
    with raises_llm(LLMStatusCode.LLM_FEATURE_NOT_ENABLED) as excinfo:
        mooncake_agent.import_transfer_engine()
    assert 'pip install "llm_datadist_torch[mooncake]"' in str(excinfo.value)
    assert "libibverbs1" in str(excinfo.value)


@pytest.mark.parametrize("prompt_backend,decoder_backend,decoder_host", [
    ("mooncake", "mooncake", "host-a"),  # forced on both: the client fails before its hello
    ("mooncake", None, "host-a"),        # forced by the server only: it refuses the hello
    (None, None, "host-b"),              # another host, automatic choice
])
def test_links_needing_mooncake_fail_without_it(no_mooncake, clusters, prompt_backend,
                                                decoder_backend, decoder_host):
    port = free_port()
    clusters(LLMRole.PROMPT, 101, "host-a", f"127.0.0.1:{port}", prompt_backend)
    decoder = clusters(LLMRole.DECODER, 102, decoder_host,
                       f"127.0.0.1:{free_port()}" if decoder_backend else None, decoder_backend)
    overall, per = _link(decoder, 101, port)
    assert per == [LLMStatusCode.LLM_FEATURE_NOT_ENABLED]
    assert overall == LLMStatusCode.LLM_FEATURE_NOT_ENABLED


def test_same_host_links_never_start_mooncake(no_mooncake, clusters):
    port = free_port()
    prompt = clusters(LLMRole.PROMPT, 111, "host-a", f"127.0.0.1:{port}")
    decoder = clusters(LLMRole.DECODER, 112, "host-a")
    assert _link(decoder, 111, port)[0] == LLMStatusCode.LLM_SUCCESS
    assert prompt._links.mooncake_agent is None and decoder._links.mooncake_agent is None


@pytest.mark.skipif(mooncake_missing() is not None, reason=mooncake_missing() or "")
def test_other_host_picks_mooncake_both_ways(clusters):
    """Automatic selection with differing host ids: the server starts its agent at the hello,
    the client after the reply (and sends its endpoint); both directions use mooncake; memory
    registered after the link is reachable, and forgotten by Mooncake once unregistered."""
    port = free_port()
    prompt = clusters(LLMRole.PROMPT, 121, "host-a", f"127.0.0.1:{port}")
    decoder = clusters(LLMRole.DECODER, 122, "host-b")
    assert _link(decoder, 121, port)[0] == LLMStatusCode.LLM_SUCCESS
    shape = [8, 1024]
    desc = CacheDesc(2, shape, DataType.DT_UINT8, Placement.DEVICE)
    owned = [torch.randint(0, 255, shape, dtype=torch.uint8) for _ in range(2)]
    registered = prompt.cache_manager.register_blocks_cache(desc, [t.data_ptr() for t in owned],
                                                            BlocksCacheKey(121, 0))
    local = decoder.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(122, 0))
    decoder.cache_manager.pull_blocks(BlocksCacheKey(121, 0), local, [1, 6], [0, 7])
    for mine, theirs in zip(local.tensors, owned):
        assert torch.equal(mine[[0, 7]], theirs[[1, 6]])
    assert sorted(decoder._links.get(121).transports) == ["mooncake"]
    # The other way: the server pulls from the client over the link the client made.
    back = prompt.cache_manager.allocate_blocks_cache(desc)
    prompt.cache_manager.pull_blocks(BlocksCacheKey(122, 0), back, [7], [3])
    for mine, theirs in zip(back.tensors, local.tensors):
        assert torch.equal(mine[3], theirs[7])
    assert sorted(prompt._links.get(122).transports) == ["mooncake"]
    agent = prompt._links.mooncake_agent
    assert agent._by_cache[registered.cache_id]
    prompt.cache_manager.unregister_cache(registered.cache_id)
    # The decoder kept the answer about this cache: the memory goes once it was told to forget.
    deadline = time.monotonic() + 5
    while registered.cache_id in agent._by_cache:
        assert time.monotonic() < deadline, "the unregistered cache stayed registered with Mooncake"
        time.sleep(0.005)


@pytest.mark.skipif(mooncake_missing() is not None, reason=mooncake_missing() or "")
def test_an_agent_for_one_link_starts_none_for_same_host_peers(clusters):
    far_port, near_port = free_port(), free_port()
    clusters(LLMRole.PROMPT, 131, "host-b", f"127.0.0.1:{far_port}")
    near = clusters(LLMRole.PROMPT, 132, "host-a", f"127.0.0.1:{near_port}")
    decoder = clusters(LLMRole.DECODER, 133, "host-a")
    assert _link(decoder, 131, far_port)[0] == LLMStatusCode.LLM_SUCCESS
    assert decoder._links.mooncake_agent is not None
    assert _link(decoder, 132, near_port)[0] == LLMStatusCode.LLM_SUCCESS
    assert near._links.mooncake_agent is None


# ---- the agent's batching (a stub in place of Mooncake's engine) --------------------------------
class StubEngine:
    def __init__(self, result=0):
        self.result = result
        self.batches = []

    def batch_transfer_sync_read(self, target, local, remote, lengths):
        self.batches.append(len(lengths))
        return self.result


def _stub_agent(engine):
    agent = object.__new__(mooncake_agent.MooncakeAgent)  # no Mooncake needed
    agent._te = engine
    agent._budgets = {"t": [threading.Condition(), mooncake_agent.MAX_PENDING_PER_PEER]}
    return agent


def test_large_transfers_go_in_bounded_batches():
    engine = StubEngine()
    agent = _stub_agent(engine)
    n = 2 * mooncake_agent.MAX_PENDING_PER_PEER + 452
    call = mooncake_agent.InFlight(None, n, 30.0)
    assert agent._run_batches(call, "t", list(range(n)), list(range(n)), [1] * n, False) == 0
    assert engine.batches == [mooncake_agent.MAX_PENDING_PER_PEER] * 2 + [452]
    assert agent._budgets["t"][1] == mooncake_agent.MAX_PENDING_PER_PEER  # all given back


def test_a_failing_or_abandoned_transfer_stops_its_batches():
    engine = StubEngine(result=-1)
    agent = _stub_agent(engine)
    n = 3 * mooncake_agent.MAX_PENDING_PER_PEER
    call = mooncake_agent.InFlight(None, n, 30.0)
    assert agent._run_batches(call, "t", [0] * n, [0] * n, [1] * n, False) == -1
    assert len(engine.batches) == 1
    call.abandon()
    assert agent._run_batches(call, "t", [0] * n, [0] * n, [1] * n, False) == -2
    assert len(engine.batches) == 1


# ---- the transport contract, against a child process serving its regions through Mooncake ------
from contract import (REGION_SIZES, ChildOwner, TransportContract, region_contents,  # noqa: E402
                      serve_regions)


def _mooncake_owner_main(conn, parent_pid):
    """Child: regions in plain tensors registered with a Mooncake engine on 127.0.0.1."""
    torch.set_num_threads(1)
    try:
        engine = mooncake_agent.import_transfer_engine()()
        assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        tensors = [region_contents(i, n) for i, n in enumerate(REGION_SIZES)]
        for tensor in tensors:
            assert engine.register_memory(tensor.data_ptr(), tensor.numel()) == 0
        endpoint = f"127.0.0.1:{engine.get_rpc_port()}"
        regions = [Region(t.data_ptr(), t.numel()) for t in tensors]
        conn.send(("ok", (os.getpid(), endpoint, regions)))
        serve_regions(conn, tensors)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", repr(exc)))


class MooncakeOwner(ChildOwner):
    def __init__(self, agent):  # noqa: D107 - same protocol as ChildOwner, another child
        pid, endpoint, self.regions = self._spawn(_mooncake_owner_main, os.getpid())
        self.peer = Peer(pid, same_process=False, same_host=True, mooncake_endpoint=endpoint,
                         mooncake_agent=agent)


def _bare_engine():
    """What MooncakeAgent needs of an `Engine`, with no pools or caches."""
    table = types.SimpleNamespace(lock=threading.RLock(), entries=lambda: [])
    return types.SimpleNamespace(options=types.SimpleNamespace(sync_kv_timeout_ms=5000),
                                 table=table, pools={}, cluster_id=0, memory_listener=None,
                                 fences=None)  # no caches, so no fence words to reach


@pytest.mark.skipif(mooncake_missing() is not None, reason=mooncake_missing() or "")
class TestMooncakeTransport(TransportContract):
    transport_name = "mooncake"
    _agent = None

    @classmethod
    def make_owner(cls):
        if TestMooncakeTransport._agent is None:  # this process's side, shared by the class
            TestMooncakeTransport._agent = mooncake_agent.MooncakeAgent(_bare_engine(), "127.0.0.1")
        return MooncakeOwner(TestMooncakeTransport._agent)

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _close_agent(cls):
        yield
        if TestMooncakeTransport._agent is not None:
            TestMooncakeTransport._agent.close()
            TestMooncakeTransport._agent = None

    def test_chosen_for_its_owner(self, owner):
        # Same host: automatic choice prefers cma; mooncake is chosen when forced.
        for region in owner.regions:
            assert MooncakeTransport.can_serve(owner.peer, region)
            assert choose_transport(owner.peer, region, "mooncake") is MooncakeTransport
