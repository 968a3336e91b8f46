"""Several processes at once: fan-out and fan-in, concurrent pulls, a prompt crash and restart,
link churn, two-sided `link()`, and `switch_role` (spec §8.5-8.8)."""
import json
import statistics
import time
import types

import pytest

from agents import agent, key, new_cluster_id
from checks import B_SHAPE, FAST_S, Model, raises_code
from harness import ChildError
from helpers import assert_no_shm_files, shm_files
from llm_datadist_torch import LLMStatusCode
from llm_datadist_torch.control.host import free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]


BIG_SHAPE = [64, 4, 2, 8]  # a decoder cache with room for many threads' blocks


def init_all(children, settings):
    """Initialize several children in parallel; their init results."""
    for child, (args, kwargs) in zip(children, settings):
        child.begin("init", *args, **kwargs)
    return [child.end(60) for child in children]


@pytest.fixture(scope="module")
def cluster(module_harness):
    """Two prompts and two decoders. D1 links with P1 and P2 in one link_clusters call (2P x 1D),
    D2 with P1 (1P x 2D). Each prompt registers a blocks cache (K, V of 2 layers) as model 0."""
    h = module_harness
    ids = [new_cluster_id() for _ in range(4)]
    kids = [h.spawn(agent, name=name) for name in ("P1", "P2", "D1", "D2")]
    infos = init_all(kids, [((ids[0], "PROMPT"), {"listen": True}), ((ids[1], "PROMPT"), {"listen": True}),
                            ((ids[2], "DECODER"), {}), ((ids[3], "DECODER"), {})])
    c = types.SimpleNamespace(p1=kids[0], p2=kids[1], d1=kids[2], d2=kids[3], p1_id=ids[0],
                              p2_id=ids[1], d1_id=ids[2], d2_id=ids[3], p1_port=infos[0]["port"],
                              p2_port=infos[1]["port"])
    c.p1.call("register", "kv", 4, B_SHAPE, seed=1, model_id=0)
    c.p2.call("allocate", "kv", 4, B_SHAPE, seed=2, blocks=True, model_id=0)
    result = c.d1.call("link_many", [(c.p1_id, c.p1_port), (c.p2_id, c.p2_port)])
    assert result == {"overall": 0, "per": [0, 0]}, result
    start = time.monotonic()
    result = c.d2.call("link", c.p1_id, c.p1_port)
    c.link_ms = result["ms"]
    c.link_round_trip_ms = (time.monotonic() - start) * 1e3
    assert result["overall"] == 0, result
    assert c.d2.call("link", c.p1_id, c.p1_port)["per"] == [int(LLMStatusCode.LLM_ALREADY_LINK)]
    yield c
    for d, p, port in ((c.d1, c.p1_id, c.p1_port), (c.d1, c.p2_id, c.p2_port), (c.d2, c.p1_id, c.p1_port)):
        assert d.call("unlink", p, port)["overall"] == 0
    for child in kids:
        child.finish()
        assert_no_shm_files(child.pid)


def test_one_prompt_two_decoders(cluster):
    c = cluster
    for d in (c.d1, c.d2):
        d.call("register", "fan_out", 4, B_SHAPE, seed=10)
    c.d1.begin("pull_blocks", key("BlocksCacheKey", c.p1_id, 0), "fan_out", [0, 1, 2, 3], [4, 5, 6, 7])
    c.d2.begin("pull_blocks", key("BlocksCacheKey", c.p1_id, 0), "fan_out", [7, 6, 5, 4], [0, 1, 2, 3])
    c.d1.end()
    c.d2.end()
    src = Model(1, 4, B_SHAPE)
    for d, pairs in ((c.d1, zip([0, 1, 2, 3], [4, 5, 6, 7])), (c.d2, zip([7, 6, 5, 4], [0, 1, 2, 3]))):
        dst = Model(10, 4, B_SHAPE)
        for s, b in pairs:
            for i in range(4):
                dst.t[i][b] = src.t[i][s]
        dst.check(d, "fan_out")
    src.check(c.p1, "kv")


def test_two_prompts_one_decoder(cluster):
    c = cluster
    c.d1.call("allocate", "fan_in", 4, B_SHAPE, seed=20, blocks=True)
    c.d1.call("pull_blocks", key("BlocksCacheKey", c.p1_id, 0), "fan_in", [0, 1], [0, 1])
    c.d1.call("pull_blocks", key("BlocksCacheKey", c.p2_id, 0), "fan_in", [0, 1], [2, 3],
              src_layer_range=range(0, 2), dst_layer_range=range(0, 2))
    dst, p1, p2 = Model(20, 4, B_SHAPE), Model(1, 4, B_SHAPE), Model(2, 4, B_SHAPE)
    for i in range(4):
        dst.t[i][0], dst.t[i][1] = p1.t[i][0], p1.t[i][1]
        dst.t[i][2], dst.t[i][3] = p2.t[i][0], p2.t[i][1]
    dst.check(c.d1, "fan_in")
    # Registered memory by cma; the fence word of the cache (in /dev/shm) by shm.
    assert c.d1.call("transports_used", c.p1_id) == ["cma", "shm"]
    assert c.d1.call("transports_used", c.p2_id) == ["shm"]  # pool memory


def test_eight_threads_pull_from_one_link(cluster):
    c = cluster
    c.d1.call("register", "threads", 4, BIG_SHAPE, seed=30)
    jobs = []
    for t in range(8):
        jobs.append([([(t + k) % 8, (t + 3 * k + 1) % 8], [t * 8 + 2 * k, t * 8 + 2 * k + 1])
                     for k in range(4)])
    errors = c.d1.call("pull_threads", key("BlocksCacheKey", c.p1_id, 0), "threads", jobs, timeout=60)
    assert errors == []
    dst, src = Model(30, 4, BIG_SHAPE), Model(1, 4, B_SHAPE)
    for pulls in jobs:
        for src_blocks, dst_blocks in pulls:
            for s, b in zip(src_blocks, dst_blocks):
                for i in range(4):
                    dst.t[i][b] = src.t[i][s]
    dst.check(c.d1, "threads")


def test_link_unlink_cycles_leak_nothing(cluster):
    """100 link/unlink cycles: no growth in fds, threads or shm files on either side."""
    c = cluster
    c.d2.call("link_cycles", c.p2_id, c.p2_port, 5)  # warm up (lazy imports, zmq context, ...)

    def snapshot():
        return c.d2.call("resources"), c.p2.call("resources")

    before = snapshot()
    times = c.d2.call("link_cycles", c.p2_id, c.p2_port, 100, timeout=60)
    deadline = time.monotonic() + 3  # zmq closes sockets asynchronously: let it settle
    while True:
        after = snapshot()
        grown = [(side, what, b[what], a[what]) for side, b, a in zip(("decoder", "prompt"), before, after)
                 for what in ("fds", "threads") if a[what] > b[what]]
        if not grown or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not grown, f"resources grew over 100 link/unlink cycles: {grown}"
    assert [a["shm"] for a in after] == [b["shm"] for b in before]
    print(f"\nlink_clusters over 100 cycles: p50 {statistics.median(times):.2f} ms, "
          f"max {max(times):.2f} ms")


def test_latency_numbers(cluster, record_property):
    """Not asserted (benchmarks never are): link_clusters time and 1-block pull latency."""
    c = cluster
    c.d2.call("register", "lat", 4, B_SHAPE, seed=40)
    cma = c.d2.call("pull_blocks_timed", key("BlocksCacheKey", c.p1_id, 0), "lat", [3], [3], 200)
    c.d1.call("register", "lat", 4, B_SHAPE, seed=40)
    shm = c.d1.call("pull_blocks_timed", key("BlocksCacheKey", c.p2_id, 0), "lat", [3], [3], 200)
    numbers = {"link_clusters_ms": round(c.link_ms, 2),
               "pull_1_block_p50_ms_cma": round(statistics.median(cma[20:]), 3),
               "pull_1_block_p50_ms_shm": round(statistics.median(shm[20:]), 3)}
    for name, value in numbers.items():
        record_property(name, value)
    print(f"\n{numbers} (block = 4 tensors x {B_SHAPE[1] * B_SHAPE[2] * B_SHAPE[3] * 2} bytes)")


# ---- a prompt crash in the middle of a series of pulls, then a restart ------------------------
def test_prompt_killed_mid_series_then_restarted(harness):
    """SIGKILL the prompt during a series of pulls: a clean LLMException within sync_kv_timeout;
    force-unlink, restart it on the same port, link and pull again. Then the same for the decoder."""
    h = harness
    pid, did, timeout_ms = new_cluster_id(), new_cluster_id(), 1000
    p, d = h.spawn(agent, name="prompt"), h.spawn(agent, name="decoder")
    port = init_all([p, d], [((pid, "PROMPT"), {"listen": True}),
                             ((did, "DECODER"), {"sync_kv_timeout": timeout_ms})])[0]["port"]
    p.call("allocate", "kv", 4, B_SHAPE, seed=50, blocks=True, model_id=0)
    d.call("allocate", "kv", 4, B_SHAPE, seed=51, blocks=True)
    assert d.call("link", pid, port)["overall"] == 0
    bkey = key("BlocksCacheKey", pid, 0)

    d.call("start_series", bkey, "kv", [1, 2], [1, 2], max_s=30)
    deadline = time.monotonic() + 20
    while d.call("series_count") < 50:
        assert time.monotonic() < deadline, "the pull series does not progress"
        time.sleep(0.01)
    crashed_files = shm_files(p.pid)
    assert crashed_files, "the prompt's pool should live in /dev/shm"
    p.kill()
    result = d.call("series_result", timeout_ms / 1000 + 5, timeout=15)
    error = result["error"]
    assert error["status_code"] is not None, result  # an LLMException, not "no error"
    assert error["call_s"] < timeout_ms / 1000 + 1.0, result
    print(f"\nprompt killed after {result['count']} pulls: the next pull failed after "
          f"{error['call_s'] * 1e3:.0f} ms with status {error['status_code']}: {error['message']}")
    # A SIGKILLed process cleans nothing up; its files stay until some process of this host
    # creates a pool (possibly another test session's, so they may be gone already) ...

    p2 = h.spawn(agent, name="prompt-restarted")
    assert p2.call("init", pid, "PROMPT", listen=port, timeout=60)["port"] == port
    assert shm_files(p.pid) == []  # ... its files are swept by the next init
    p2.call("allocate", "kv", 4, B_SHAPE, seed=52, blocks=True, model_id=0)

    assert d.call("unlink", pid, force=True)["overall"] == 0
    result = d.call("link", pid, port)
    assert result["overall"] == 0, result
    d.call("pull_blocks", bkey, "kv", [0, 3], [3, 0])
    dst, old, new = Model(51, 4, B_SHAPE), Model(50, 4, B_SHAPE), Model(52, 4, B_SHAPE)
    for i in range(4):
        dst.t[i][1], dst.t[i][2] = old.t[i][1], old.t[i][2]  # the series' blocks
        dst.t[i][3], dst.t[i][0] = new.t[i][0], new.t[i][3]
    dst.check(d, "kv")

    # The other way round: the decoder dies; a new decoder with the same cluster id links again
    # without any cleanup on the prompt, which replaces its stale link (spec §8.5) ...
    d.kill()
    d2 = h.spawn(agent, name="decoder-restarted")
    d2.call("init", did, "DECODER", timeout=60)
    d2.call("register", "kv", 4, B_SHAPE, seed=53, model_id=0)
    assert d2.call("link", pid, port)["overall"] == 0
    # ... and reaches the new process when it uses the link in its direction.
    p2.call("allocate", "back", 4, B_SHAPE, seed=54, blocks=True)
    p2.call("pull_blocks", key("BlocksCacheKey", did, 0), "back", [6], [1])
    back, d2_model = Model(54, 4, B_SHAPE), Model(53, 4, B_SHAPE)
    for i in range(4):
        back.t[i][1] = d2_model.t[i][6]
    back.check(p2, "back")
    assert d2.call("unlink", pid, port)["overall"] == 0
    for child in (p2, d2):
        child.finish()
        assert_no_shm_files(child.pid)


# ---- two-sided link() with a rank table ---------------------------------------------------
def rank_table(ports):
    devices = [{"device_id": str(rank), "device_ip": "127.0.0.1", "device_port": port,
                "rank_id": str(rank)} for rank, port in enumerate(ports)]
    return json.dumps({"version": "1.2", "status": "completed", "server_count": "1",
                       "server_list": [{"server_id": "127.0.0.1", "device": devices}]})


def test_two_sided_link(harness):
    h = harness
    pid, did = new_cluster_id(), new_cluster_id()
    p, d = h.spawn(agent, name="prompt"), h.spawn(agent, name="decoder")
    init_all([p, d], [((pid, "PROMPT"), {}), ((did, "DECODER"), {})])
    p.call("register", "kv", 4, B_SHAPE, seed=60, model_id=0)  # registered before link()
    d.call("register", "kv", 4, B_SHAPE, seed=61)
    table, ranks = rank_table([free_port(), free_port()]), {pid: 0, did: 1}
    p.begin("link_domain", "pd_comm_test", ranks, table)
    d.begin("link_domain", "pd_comm_test", ranks, table)
    p_comm, d_comm = p.end(), d.end()
    for child, comm in ((p, p_comm), (d, d_comm)):
        waited = child.call("wait_domain", comm, 10.0, timeout=20)
        assert waited["statuses"][-1] == "OK", waited
        assert set(waited["statuses"]) <= {"PREPARING", "OK"}, waited
    d.call("pull_blocks", key("BlocksCacheKey", pid, 0), "kv", [4, 5], [5, 4])
    dst, src = Model(61, 4, B_SHAPE), Model(60, 4, B_SHAPE)
    for i in range(4):
        dst.t[i][5], dst.t[i][4] = src.t[i][4], src.t[i][5]
    dst.check(d, "kv")
    with raises_code(LLMStatusCode.LLM_PARAM_INVALID, FAST_S):  # forbidden after link()
        d.call("register", "late", 2, B_SHAPE, seed=62, remote_accessible=True)
    d.call("unlink_domain", d_comm)
    p.call("unlink_domain", p_comm)
    with raises_code(LLMStatusCode.LLM_NOT_YET_LINK, FAST_S):
        d.call("pull_blocks", key("BlocksCacheKey", pid, 0), "kv", [0], [0])
    with raises_code(LLMStatusCode.LLM_NOT_YET_LINK, FAST_S):
        d.call("wait_domain", d_comm)
    for child in (p, d):
        child.finish()
        assert_no_shm_files(child.pid)


# ---- switch_role ---------------------------------------------------------------------------
def test_switch_role(harness):
    """The upstream sample's flow: pull, unlink, swap roles (the listener moves), link the other
    way, pull and push again; switch_role refuses while any link exists."""
    h = harness
    aid, bid = new_cluster_id(), new_cluster_id()
    a, b = h.spawn(agent, name="A"), h.spawn(agent, name="B")
    common = {"remote_accessible": True, "switch_role": True}
    a_port = init_all([a, b], [((aid, "PROMPT"), {"listen": True, **common}),
                               ((bid, "DECODER"), common)])[0]["port"]
    a.call("register", "kv", 4, B_SHAPE, seed=70, model_id=0)
    b.call("register", "kv", 4, B_SHAPE, seed=71, model_id=0)
    a_model, b_model = Model(70, 4, B_SHAPE), Model(71, 4, B_SHAPE)

    assert b.call("link", aid, a_port)["overall"] == 0
    b.call("pull_blocks", key("BlocksCacheKey", aid, 0), "kv", [0], [0])
    for i in range(4):
        b_model.t[i][0] = a_model.t[i][0]
    for child, role in ((a, "DECODER"), (b, "PROMPT")):  # both ends hold the link
        with raises_code(LLMStatusCode.LLM_EXIST_LINK, FAST_S):
            child.call("switch_role", role)
    assert b.call("unlink", aid, a_port)["overall"] == 0  # tells A too

    assert a.call("switch_role", "DECODER") is None          # stops listening
    b_port = b.call("switch_role", "PROMPT", True)           # starts listening
    assert b_port
    assert a.call("link", bid, b_port)["overall"] == 0
    a.call("pull_blocks", key("BlocksCacheKey", bid, 0), "kv", [0, 7], [6, 7])
    for i in range(4):
        a_model.t[i][6], a_model.t[i][7] = b_model.t[i][0], b_model.t[i][7]
    # The sample's push: 2 "layers" of one tensor each (tensors 0 and 1 only).
    a.call("push_blocks", key("BlocksCacheKey", bid, 0), "kv", [1], [2], src_layer_range=range(0, 2),
           dst_layer_range=range(0, 2), tensor_num_per_layer=1)
    b_model.t[0][2], b_model.t[1][2] = a_model.t[0][1], a_model.t[1][1]
    a_model.check(a, "kv")
    b_model.check(b, "kv")
    # Nothing listens on A's old port any more.
    result = b.call("link", new_cluster_id(), a_port, 300)
    assert result["per"] == [int(LLMStatusCode.LLM_LINK_FAILED)], result
    with raises_code(LLMStatusCode.LLM_EXIST_LINK, FAST_S):
        b.call("switch_role", "DECODER")
    assert a.call("unlink", bid, b_port)["overall"] == 0
    b.call("switch_role", "DECODER")  # no link left: allowed
    for child in (a, b):
        child.finish()
        assert_no_shm_files(child.pid)


def test_child_errors_are_reported(harness):
    """The harness itself: an exception in a child comes back with the child's traceback."""
    child = harness.spawn(agent, name="broken")
    with pytest.raises(ChildError) as info:
        child.call("allocate", "x", 1, [1], seed=0)  # not initialized
    assert "Traceback" in info.value.child_traceback and "allocate" in info.value.child_traceback
    child.call("init", new_cluster_id())  # the child goes on serving after a failed call
    child.finish()
    assert_no_shm_files(child.pid)
