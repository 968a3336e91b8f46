"""Faults between two processes: a peer killed, stopped, finalized, or dropping memory and keys
while the other side moves bytes. Every call must end within its deadline with a typed status
(or succeed), and a success must always bring exactly the owner's bytes; memory given back must
never receive a byte. Each scenario records the time from the fault to the first error; run with
`pytest -s` for the table.

The loops run in the children (`Agent.start_loop`): they poison the destination rows before each
pull and compare them with the owner's pattern after each success, so "wrong bytes reported as
success" is counted where it happens, not guessed from a final state.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from agents import agent, key, new_cluster_id
from checks import B_SHAPE, C_SHAPE, D_C_SHAPE, SYNC_TIMEOUT_MS, Model, start_pair
from harness import ChildError
from helpers import assert_no_shm_files, shm_files
from llm_datadist_torch import LLMStatusCode

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]

LINK_CODES = {"LLM_LINK_FAILED", "LLM_NOT_YET_LINK"}
GONE_CODES = {"LLM_KV_CACHE_NOT_EXIST"}
FAST_S = 2.0          # "fails fast": well under the 10 s sync_kv_timeout of the pairs
REQ = 7001            # the request key of the owner's registered contiguous cache
RESULTS = []          # (scenario, outcome, time to error or None)


def record(scenario: str, outcome: str, seconds=None) -> None:
    RESULTS.append((scenario, outcome, seconds))
    shown = "-" if seconds is None else f"{seconds:.3f} s"
    print(f"\n[fault] {scenario}: {outcome} (time to error {shown})")


@pytest.fixture(scope="module", autouse=True)
def fault_table():
    yield
    if not RESULTS:
        return
    width = max(len(r[0]) for r in RESULTS)
    lines = [f"{'scenario'.ljust(width)} | time to error | outcome",
             f"{'-' * width}-|---------------|--------"]
    for scenario, outcome, seconds in RESULTS:
        shown = "-" if seconds is None else f"{seconds:9.3f} s"
        lines.append(f"{scenario.ljust(width)} | {shown.rjust(13)} | {outcome}")
    print("\n\nfault scenarios\n" + "\n".join(lines))


# ---- caches and the loops over them -------------------------------------------------------
SEEDS = (101, 102, 103)


def owner_caches(p, pid: int, seeds=SEEDS) -> None:
    """Pool blocks (shm, model 0), registered blocks (cma, model 1), and a registered contiguous
    cache whose request key is asked for on every pull (a round trip each time)."""
    p.call("allocate", "pool", 4, B_SHAPE, seed=seeds[0], blocks=True, model_id=0)
    p.call("register", "reg", 4, B_SHAPE, seed=seeds[1], model_id=1)
    p.call("register", "regc", 2, C_SHAPE, seed=seeds[2], blocks=False,
           keys=[key("CacheKey", prompt_cluster_id=pid, req_id=REQ)])


def requester_caches(d, seed: int = 9) -> None:
    d.call("allocate", "dpool", 4, B_SHAPE, seed=seed, blocks=True)
    d.call("allocate", "dreg", 4, B_SHAPE, seed=seed, blocks=True)
    d.call("allocate", "dc", 2, D_C_SHAPE, seed=seed)


_SRC = [[0, 1, 2], [5, 6, 7]]
_DST = [[2, 0, 1], [7, 5, 6]]


def pull_op(kind: str, pid: int, thread: int = 0, seeds=SEEDS, check: bool = True) -> dict:
    """A checked pull of `kind`: "pool" (shm, kept answer), "reg" (cma, kept answer) or "rt"
    (cma, asked every time); `thread` picks destination rows no other thread uses."""
    if kind == "rt":
        op = {"op": "pull_cache", "spec": key("CacheKey", prompt_cluster_id=pid, req_id=REQ),
              "cache": "dc", "args": [thread]}
        expect = {"seed": seeds[2], "shape": C_SHAPE, "tensors": [(0, 0), (1, 1)],
                  "rows": [(0, thread)]}
    else:
        model, seed = (0, seeds[0]) if kind == "pool" else (1, seeds[1])
        op = {"op": "pull_blocks", "spec": key("BlocksCacheKey", pid, model),
              "cache": "dpool" if kind == "pool" else "dreg", "args": [_SRC[thread], _DST[thread]]}
        expect = {"seed": seed, "shape": B_SHAPE, "tensors": [(i, i) for i in range(4)],
                  "rows": list(zip(_SRC[thread], _DST[thread]))}
    if check:
        op["expect"] = expect
    return op


def wait_for(child, loop_id: str, ok: int, timeout_s: float = 30.0) -> dict:
    """Until the loop has `ok` successes (it is warm and moving)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = child.call("loop_status", loop_id)
        assert status["first_error"] is None, status
        if status["ok"] >= ok:
            return status
        assert time.monotonic() < deadline, f"loop {loop_id} made {status['ok']} pulls"
        time.sleep(0.05)


def assert_clean_loop(result: dict, allowed: set, name: str) -> None:
    """No thread left running, no wrong bytes as success, only typed statuses from `allowed`."""
    assert result["alive"] == 0, f"{name}: {result['alive']} transfer threads hang: {result}"
    assert result["bad"] == 0, f"{name}: wrong bytes reported as success: {result['bad_detail']}"
    assert not result["untyped"], f"{name}: untyped exceptions: {result['untyped']}"
    unexpected = set(result["errors"]) - allowed
    assert not unexpected, f"{name}: unexpected statuses {result['errors']} (allowed {allowed})"


def call_failure(child, *args, timeout: float = 30.0):
    """(status name, seconds) of a call that must fail with an LLMException in the child."""
    start = time.monotonic()
    with pytest.raises(ChildError) as info:
        child.call(*args, timeout=timeout)
    elapsed = time.monotonic() - start
    assert info.value.exc_type == "LLMException", info.value
    return LLMStatusCode(info.value.status_code).name, elapsed


def pull_all_and_check(d, pid: int, seeds, dseed: int = 9) -> None:
    """Byte-exact pulls of every kind into freshly filled destinations."""
    for name in ("dpool", "dreg", "dc"):
        d.call("fill", name, dseed)
    d.call("pull_blocks", key("BlocksCacheKey", pid, 0), "dpool", [0, 3, 7], [7, 3, 0])
    d.call("pull_blocks", key("BlocksCacheKey", pid, 1), "dreg", [1, 2], [2, 1])
    d.call("pull_cache", key("CacheKey", prompt_cluster_id=pid, req_id=REQ), "dc", 2)
    dpool, dreg, dc = Model(dseed, 4, B_SHAPE), Model(dseed, 4, B_SHAPE), Model(dseed, 2, D_C_SHAPE)
    pool, reg = Model(seeds[0], 4, B_SHAPE), Model(seeds[1], 4, B_SHAPE)
    regc = Model(seeds[2], 2, C_SHAPE)
    for i in range(4):
        for s, t in ((0, 7), (3, 3), (7, 0)):
            dpool.t[i][t] = pool.t[i][s]
        for s, t in ((1, 2), (2, 1)):
            dreg.t[i][t] = reg.t[i][s]
    for i in range(2):
        dc.t[i][2] = regc.t[i][0]
    dpool.check(d, "dpool")
    dreg.check(d, "dreg")
    dc.check(d, "dc")


# ---- 2. a peer killed (SIGKILL) during a series of pulls ------------------------------------
def test_owner_killed_during_pulls_fails_fast_and_heals(harness):
    pair = start_pair(harness)  # sync_kv_timeout 10 s: fast failures are not timeouts
    p, d, pid = pair.p, pair.d, pair.pid
    owner_caches(p, pid)
    requester_caches(d)
    d.call("start_loop", "kept", [[pull_op("pool", pid, 0), pull_op("reg", pid, 1)]],
           max_s=120, stop_on_error=True)
    d.call("start_loop", "rt", [[pull_op("rt", pid, 0)]], max_s=120, stop_on_error=True)
    wait_for(d, "kept", 200)
    wait_for(d, "rt", 50)

    killed = time.monotonic()
    p.kill()
    # The next round trip, issued right after the death (before anything reaped the link):
    op = pull_op("rt", pid, 1, check=False)
    next_code, next_s = call_failure(d, op["op"], op["spec"], op["cache"], *op["args"])
    record("kill owner: next round-trip pull, issued at once", next_code, next_s)
    kept = d.call("wait_loop", "kept", 20, timeout=30)
    rt = d.call("wait_loop", "rt", 20, timeout=30)
    assert_clean_loop(kept, LINK_CODES, "one-sided pulls")
    assert_clean_loop(rt, LINK_CODES, "round-trip pulls")
    kept_s = kept["first_error"]["t"] - killed
    rt_s = rt["first_error"]["t"] - killed
    record("kill owner: one-sided pulls in flight (shm+cma)",
           f"{kept['first_error']['status']} after {kept['ok']} exact pulls", kept_s)
    record("kill owner: round-trip pull in flight",
           f"{rt['first_error']['status']} after {rt['ok']} exact pulls", rt_s)

    # The next call of each kind, on the link that saw the death or not yet:
    fresh = {}
    for kind in ("rt", "pool", "reg"):
        op = pull_op(kind, pid, 0, check=False)
        code, seconds = call_failure(d, op["op"], op["spec"], op["cache"], *op["args"])
        fresh[kind] = (code, seconds)
        record(f"kill owner: later {kind} pull", code, seconds)
    assert kept["first_error"]["status"] in LINK_CODES
    # A same-host owner that died fails round trips at once, never at their deadline.
    assert next_code in LINK_CODES and next_s < FAST_S, (next_code, next_s)
    assert kept_s < FAST_S, f"one-sided pulls failed {kept_s:.2f} s after the kill"
    for kind, (code, seconds) in fresh.items():
        assert code in LINK_CODES and seconds < FAST_S, (kind, code, seconds)

    # Back with the same cluster id on the same port: one force unlink + link heals the pair.
    p2 = harness.spawn(agent, name="prompt-restarted")
    assert p2.call("init", pid, "PROMPT", listen=pair.port,
                   sync_kv_timeout=SYNC_TIMEOUT_MS, timeout=60)["port"] == pair.port
    seeds2 = (201, 202, 203)
    owner_caches(p2, pid, seeds2)
    code, seconds = call_failure(d, "pull_blocks", key("BlocksCacheKey", pid, 0), "dpool", [0], [0])
    assert code in LINK_CODES and seconds < FAST_S, (code, seconds)
    assert d.call("unlink", pid, force=True)["overall"] == 0
    assert d.call("link", pid, pair.port)["overall"] == 0
    pull_all_and_check(d, pid, seeds2)
    record("kill owner: restart + unlink(force) + link", "healed, pulls byte-exact")
    # A slow round trip in flight when the owner died is bounded by its deadline, not by FAST_S.
    assert rt_s < SYNC_TIMEOUT_MS / 1000 + 1.0, rt_s
    d.call("unlink", pid, pair.port)
    p2.finish()
    d.finish()
    assert_no_shm_files(p2.pid)
    assert_no_shm_files(d.pid)


def test_round_trip_in_flight_when_the_owner_dies_fails_fast(harness):
    pair = start_pair(harness, decoder_kwargs={"sync_kv_timeout": 4000})  # still > FAST_S
    owner_caches(pair.p, pair.pid)
    requester_caches(pair.d)
    pull_all_and_check(pair.d, pair.pid, SEEDS)
    pair.p.signal(signal.SIGSTOP)       # the request reaches the owner and stays unanswered ...
    op = pull_op("rt", pair.pid, 0, check=False)
    started = time.monotonic()
    pair.d.begin(op["op"], op["spec"], op["cache"], *op["args"])
    time.sleep(0.3)
    pair.p.kill()                       # ... when the owner dies
    with pytest.raises(ChildError) as info:
        pair.d.end(30)
    elapsed = time.monotonic() - started - 0.3
    code = LLMStatusCode(info.value.status_code).name
    record("kill owner: round trip in flight (deterministic)", code, elapsed)
    assert code in LINK_CODES and elapsed < FAST_S, (code, elapsed)


# ---- 3. a peer stopped (SIGSTOP) during transfers, then continued ---------------------------
@pytest.mark.parametrize("stopped", ["owner", "requester"])
def test_stopped_peer_calls_end_within_their_deadline(harness, stopped):
    timeout_ms = 1000
    pair = start_pair(harness, prompt_kwargs={"sync_kv_timeout": timeout_ms},
                      decoder_kwargs={"sync_kv_timeout": timeout_ms})
    p, d, pid = pair.p, pair.d, pair.pid
    owner_caches(p, pid)
    requester_caches(d)
    d.call("start_loop", "s", [[pull_op("pool", pid, 0), pull_op("reg", pid, 1)],
                               [pull_op("rt", pid, 0)]], max_s=120, pause_s=0.002)
    wait_for(d, "s", 300)
    victim = p if stopped == "owner" else d
    t_stop = time.monotonic()
    victim.signal(signal.SIGSTOP)
    time.sleep(3.0)
    victim.signal(signal.SIGCONT)
    time.sleep(0.5)
    result = d.call("stop_loop", "s", timeout=30)
    assert_clean_loop(result, LINK_CODES | {"LLM_TIMEOUT"}, f"{stopped} stopped")
    first = result["first_error"]
    since = None if first is None else first["t"] - t_stop
    record(f"SIGSTOP {stopped} 3 s, SIGCONT",
           f"{'no error' if first is None else first['status'] + ' (' + first['op'] + ')'}; "
           f"{result['ok']} exact, errors {result['errors']}, longest call "
           f"{result['max_call_s']:.2f} s", since)
    if stopped == "owner":
        # The owner cannot answer: a round trip fails at its deadline with LLM_TIMEOUT (the
        # link is then broken: LLM_NOT_YET_LINK at once); one-sided reads may go on.
        assert first is not None and first["status"] == "LLM_TIMEOUT", result
        assert since < timeout_ms / 1000 + 1.0, since
        assert result["max_call_s"] < timeout_ms / 1000 + 1.0, result
    # Re-link after the fault; pulls are byte-exact again.
    assert d.call("unlink", pid, force=True)["overall"] == 0
    assert d.call("link", pid, pair.port)["overall"] == 0
    pull_all_and_check(d, pid, SEEDS)
    d.call("unlink", pid, pair.port)
    for child in (p, d):
        child.finish()
        assert_no_shm_files(child.pid)


# ---- 4. the owner's staging area of a dead requester -----------------------------------------
def _staging(pid: int):
    return [name for name in shm_files(pid) if ".staging." in name]


def test_staging_area_of_a_killed_requester_is_freed_within_seconds(harness):
    p = harness.spawn(agent, name="owner")
    staged = {"LLM_DATADIST_TORCH_STAGE_TRANSFERS": "1"}
    d = harness.spawn(agent, name="requester-staged", env=staged)
    pid, did = new_cluster_id(), new_cluster_id()
    p.begin("init", pid, "PROMPT", listen=True, sync_kv_timeout=SYNC_TIMEOUT_MS)
    d.begin("init", did, "DECODER", sync_kv_timeout=SYNC_TIMEOUT_MS)
    port = p.end(60)["port"]
    d.end(60)
    owner_caches(p, pid)
    requester_caches(d)
    assert d.call("link", pid, port)["overall"] == 0
    pull_all_and_check(d, pid, SEEDS)
    assert len(_staging(p.pid)) == 1, shm_files(p.pid)
    d.call("start_loop", "st", [[pull_op("pool", pid, 0), pull_op("rt", pid, 0)]], max_s=60)
    wait_for(d, "st", 50)
    killed = time.monotonic()
    d.kill()
    while _staging(p.pid) and time.monotonic() - killed < 15:
        time.sleep(0.02)
    freed_s = time.monotonic() - killed
    record("kill requester during staged pulls: owner's staging file",
           "removed" if not _staging(p.pid) else "still there", freed_s)
    assert not _staging(p.pid), f"staging area still there {freed_s:.1f} s after the kill"
    assert freed_s < 5.0, freed_s

    # The owner serves a new staged requester as before, and frees its area at unlink.
    d2 = harness.spawn(agent, name="requester-staged-2", env=staged)
    d2.call("init", new_cluster_id(), "DECODER", sync_kv_timeout=SYNC_TIMEOUT_MS, timeout=60)
    requester_caches(d2)
    assert d2.call("link", pid, port)["overall"] == 0
    pull_all_and_check(d2, pid, SEEDS)
    assert len(_staging(p.pid)) == 1
    d2.call("unlink", pid, port)
    deadline = time.monotonic() + 5
    while _staging(p.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _staging(p.pid)
    for child in (p, d2):
        child.finish()
        assert_no_shm_files(child.pid)


def _proc_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("Z" for a zombie)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_staging_area_of_a_killed_unreaped_requester_is_freed_within_seconds(harness):
    p = harness.spawn(agent, name="owner")
    d = harness.spawn(agent, name="requester-staged",
                      env={"LLM_DATADIST_TORCH_STAGE_TRANSFERS": "1"})
    pid = new_cluster_id()
    port = p.call("init", pid, "PROMPT", listen=True, sync_kv_timeout=SYNC_TIMEOUT_MS,
                  timeout=60)["port"]
    d.call("init", new_cluster_id(), "DECODER", sync_kv_timeout=SYNC_TIMEOUT_MS, timeout=60)
    owner_caches(p, pid)
    requester_caches(d)
    assert d.call("link", pid, port)["overall"] == 0
    pull_all_and_check(d, pid, SEEDS)
    assert len(_staging(p.pid)) == 1
    os.kill(d.pid, signal.SIGKILL)  # dead; nobody waits for it (the harness reaps at teardown)
    killed = time.monotonic()
    while _staging(p.pid) and time.monotonic() - killed < 6:
        time.sleep(0.02)
    freed_s = time.monotonic() - killed
    state = _proc_state(d.pid)
    record("kill requester, not reaped (zombie): owner's staging file",
           f"{'removed' if not _staging(p.pid) else 'still there'} (requester state {state})",
           freed_s if not _staging(p.pid) else None)
    assert state == "Z"
    assert not _staging(p.pid), f"staging area still there {freed_s:.1f} s after the kill"


def test_killed_unreaped_owner_fails_the_next_pull_fast(harness):
    pair = start_pair(harness)
    owner_caches(pair.p, pair.pid)
    requester_caches(pair.d)
    pull_all_and_check(pair.d, pair.pid, SEEDS)
    os.kill(pair.p.pid, signal.SIGKILL)  # not reaped until teardown
    time.sleep(0.2)
    assert _proc_state(pair.p.pid) == "Z"
    op = pull_op("pool", pair.pid, 0, check=False)
    started = time.monotonic()
    try:
        pair.d.call(op["op"], op["spec"], op["cache"], *op["args"])
        outcome, elapsed = "SUCCESS from a dead owner's memory", None
    except ChildError as exc:
        outcome = (LLMStatusCode(exc.status_code).name if exc.status_code is not None
                   else exc.exc_type)
        elapsed = time.monotonic() - started
    record("kill owner, not reaped (zombie): next shm pull (kept answer)", outcome, elapsed)
    assert outcome in LINK_CODES and elapsed < FAST_S, outcome


# ---- 5. finalize while transfers run ------------------------------------------------------
def ra_owner_caches(p, pid: int, seeds=SEEDS) -> int:
    """As `owner_caches`, remote-accessible mode (pulls by CacheKeyByIdAndIndex), plus
    registered blocks "target" (model 2) that the requester pushes into."""
    p.call("allocate", "pool", 4, B_SHAPE, seed=seeds[0], blocks=True, model_id=0)
    p.call("register", "reg", 4, B_SHAPE, seed=seeds[1], model_id=1)
    regc = p.call("register", "regc", 2, C_SHAPE, seed=seeds[2], blocks=False,
                  keys=[key("CacheKey", prompt_cluster_id=pid, req_id=REQ)])
    p.call("register", "target", 4, B_SHAPE, seed=55, model_id=2)
    return regc


def ra_rt_op(pid: int, regc: int, thread: int = 0) -> dict:
    """A pull by id and index of a keyed slot: asked for on every call."""
    op = pull_op("rt", pid, thread)
    op["spec"] = key("CacheKeyByIdAndIndex", pid, regc, 0)
    return op


def push_op(pid: int, model: int, cache: str, thread: int = 0) -> dict:
    return {"op": "push_blocks", "spec": key("BlocksCacheKey", pid, model), "cache": cache,
            "args": [_SRC[thread], _DST[thread]]}


def assert_rows_are(child, name: str, num_tensors: int, allowed_models) -> None:
    """Every row of `name` in `child` equals that row in one of `allowed_models` (or, for a
    row pushed, the source row named in the model's `moves`)."""
    from agents import as_slots
    got = as_slots(child.call("read", name), B_SHAPE[0])
    for i in range(num_tensors):
        for row in range(B_SHAPE[0]):
            if not any(bool((got[i][row] == m[i][row]).all()) for m in allowed_models):
                pytest.fail(f"{name}: tensor {i} row {row} holds bytes no transfer could have "
                            f"written (first bytes {got[i][row][:8].tolist()})")


def _pushed_models(dst_seed: int, src_seed: int):
    """The target's rows: as initialized, or as pushed by thread 0 or 1 (any mix per row)."""
    initial, pushed = Model(dst_seed, 4, B_SHAPE).t, Model(dst_seed, 4, B_SHAPE).t
    src = Model(src_seed, 4, B_SHAPE).t
    for i in range(4):
        for thread in (0, 1):
            for s, t in zip(_SRC[thread], _DST[thread]):
                pushed[i][t] = src[i][s]
    return [initial, pushed]


@pytest.mark.parametrize("side", ["owner", "requester"])
def test_finalize_while_transfers_run(harness, side):
    pair = start_pair(harness, {"remote_accessible": True}, {"remote_accessible": True})
    p, d, pid = pair.p, pair.d, pair.pid
    regc = ra_owner_caches(p, pid)
    requester_caches(d)
    d.call("register", "dsrc", 4, B_SHAPE, seed=66, model_id=7)  # what the requester pushes
    d.call("register", "dregu", 4, B_SHAPE, seed=9)              # caller-owned pull destination
    # Not checked in the loop: its poisoning would itself write into the given-back memory.
    into_own = dict(pull_op("reg", pid, 1, check=False), cache="dregu")
    d.call("start_loop", "f", [
        [pull_op("pool", pid, 0), pull_op("reg", pid, 0), push_op(pid, 2, "dsrc", 0)],
        [ra_rt_op(pid, regc, 1), into_own, push_op(pid, 2, "dsrc", 1)]],
        max_s=120, pause_s=0.001)
    wait_for(d, "f", 200)
    finalizing = p if side == "owner" else d
    started = time.monotonic()
    finalizing.call("finalize", timeout=60)
    finalize_s = time.monotonic() - started
    # The memory the finalized side registered is the caller's again: it writes a guard.
    if side == "owner":
        p.call("guard_user_tensors", "target")
    else:
        d.call("guard_user_tensors", "dregu")
        d.call("guard_user_tensors", "dsrc", 0xEE)
    time.sleep(1.0)
    result = d.call("stop_loop", "f", timeout=60)
    first = result["first_error"]
    record(f"finalize on the {side} during pulls+pushes",
           f"finalize took {finalize_s:.2f} s; first {first and first['status']} "
           f"({first and first['op']}); {result['ok']} ok, errors {result['errors']}, longest "
           f"call {result['max_call_s']:.2f} s", first and first["t"] - started)
    assert_clean_loop(result, LINK_CODES | GONE_CODES | {"LLM_TIMEOUT", "LLM_PARAM_INVALID",
                                                         "LLM_FAILED"}, f"finalize {side}")
    assert first is not None, "transfers went on succeeding after finalize"
    assert finalize_s < SYNC_TIMEOUT_MS / 1000 + 2, finalize_s
    assert result["max_call_s"] < SYNC_TIMEOUT_MS / 1000 + 2, result
    if side == "owner":
        landed = p.call("check_guard", "target")
        assert landed == 0, f"{landed} bytes pushed into the owner's memory after its finalize"
    else:
        landed = d.call("check_guard", "dregu")
        assert landed == 0, f"{landed} bytes pulled into the requester's memory after its finalize"
        # Nothing read from the requester's given-back source reached the owner.
        assert_rows_are(p, "target", 4, _pushed_models(55, 66))
    for child in (p, d):
        child.finish(timeout=60)
        assert_no_shm_files(child.pid)


# ---- 6. a request key removed right after a peer resolved it --------------------------------
KEY_CACHES, KEY_SLOTS = 8, 4


def test_request_key_removed_while_a_peer_pulls_it(harness):
    """The owner allocates caches whose slots are bound to request keys and drops their handles
    (the keys keep them); the requester pulls every key while the owner removes them in another
    order after random pauses, and writes freshly allocated memory with a guard byte after each
    removal (what a retired cache gave back is reused at once). Every pull brings exactly the
    owner's slot, or fails with LLM_KV_CACHE_NOT_EXIST."""
    import random
    pair = start_pair(harness)
    p, d, pid = pair.p, pair.d, pair.pid
    d.call("allocate", "dk", 2, D_C_SHAPE, seed=9)
    rng = random.Random(6)
    batches = 100
    totals = {"ok": 0, "bad": 0, "errors": {}, "untyped": [], "bad_detail": [], "max_call_s": 0.0,
              "max_error_s": 0.0}
    started = time.monotonic()
    for batch in range(batches):
        base = 100_000 + batch * 1000
        names = [f"k{batch}.{c}" for c in range(KEY_CACHES)]
        seeds = [base + c for c in range(KEY_CACHES)]
        req_ids = [[base + c * KEY_SLOTS + s for s in range(KEY_SLOTS)] for c in range(KEY_CACHES)]
        p.call("keyed_batch", names, 2, C_SHAPE, seeds, req_ids)
        jobs = [(req_ids[c][s], seeds[c], s) for c in range(KEY_CACHES) for s in range(KEY_SLOTS)]
        rng.shuffle(jobs)
        removals = [job[0] for job in jobs]
        rng.shuffle(removals)
        p.begin("remove_keys_jittered", removals, 0.003, batch, scribble_shape=C_SHAPE,
                num_tensors=2)
        d.begin("pull_keys", pid, "dk", jobs, C_SHAPE, 2)
        out = d.end(60)
        p.end(60)
        for field in ("ok", "bad"):
            totals[field] += out[field]
        for name, count in out["errors"].items():
            totals["errors"][name] = totals["errors"].get(name, 0) + count
        totals["untyped"] += out["untyped"]
        totals["bad_detail"] += out["bad_detail"]
        totals["max_call_s"] = max(totals["max_call_s"], out["max_call_s"])
        totals["max_error_s"] = max(totals["max_error_s"], out["max_error_s"])
    elapsed = time.monotonic() - started
    record(f"remove_cache_key racing pull_cache ({batches * KEY_CACHES * KEY_SLOTS} pulls)",
           f"{totals['ok']} exact, {totals['bad']} wrong, errors {totals['errors']}, "
           f"untyped {len(totals['untyped'])}; longest call {totals['max_call_s']:.3f} s, "
           f"{elapsed:.1f} s in all", totals["max_error_s"])
    assert totals["bad"] == 0, totals["bad_detail"]
    assert not totals["untyped"], totals["untyped"]
    assert {name.split(" ")[0] for name in totals["errors"]} <= GONE_CODES, totals["errors"]
    assert totals["ok"] > 0 and totals["errors"], "the race was not exercised"
    assert totals["max_call_s"] < SYNC_TIMEOUT_MS / 1000, totals
    assert p.call("proc_stats")["shm"]  # the owner is alive and well
    d.call("unlink", pid, pair.port)
    for child in (p, d):
        child.finish()
        assert_no_shm_files(child.pid)


# ---- 7. deallocate / unregister racing pulls and pushes -------------------------------------
_case_models = iter(range(20, 1000))


def _give_back(child, name: str, memory: str) -> dict:
    """unregister (then the caller's memory gets a guard) or deallocate (then the pool's freed
    memory is allocated again and gets a guard)."""
    return child.call("unregister_keep" if memory == "registered" else "deallocate_scribble", name)


def _blocks(child, name: str, memory: str, seed: int, model=None) -> None:
    if memory == "registered":
        child.call("register", name, 4, B_SHAPE, seed=seed, model_id=model)
    else:
        child.call("allocate", name, 4, B_SHAPE, seed=seed, blocks=True, model_id=model)


@pytest.mark.parametrize("memory", ["registered", "pool"])
@pytest.mark.parametrize("op", ["pull", "push"])
@pytest.mark.parametrize("side", ["owner", "requester"])
def test_memory_given_back_while_transfers_run(ra_pair, side, op, memory):
    """Two requester threads pull from (or push into) the owner while one side gives back the
    memory a transfer uses (three rounds). A pull brings exact bytes or LLM_KV_CACHE_NOT_EXIST;
    no byte lands in memory given back (its guard stays), and no byte read from it reaches the
    peer."""
    rounds = [_give_back_round(ra_pair, side, op, memory) for _ in range(3)]
    errors = {}
    for result, _, _ in rounds:
        for name, count in result["errors"].items():
            errors[name] = errors.get(name, 0) + count
    times = [r["first_error"]["t"] - gave["t0"] for r, gave, _ in rounds]
    landed = [landed for _, _, landed in rounds]
    extra = "" if memory == "registered" else ", freed memory reused after " + "/".join(
        f"{gave['reused_s'] * 1e3:.0f}" for _, gave, _ in rounds) + " ms"
    verb = "unregister" if memory == "registered" else "deallocate"
    record(f"{verb} on the {side} during {op}{'es' if op == 'push' else 's'}",
           f"3 rounds: {sum(r['ok'] for r, _, _ in rounds)} ok, "
           f"{sum(r['bad'] for r, _, _ in rounds)} wrong, errors {errors}; give back took "
           + "/".join(f"{gave['call_s'] * 1e3:.1f}" for _, gave, _ in rounds)
           + f" ms; guard bytes overwritten: {landed if landed[0] is not None else 'n/a'}{extra}",
           max(times))


def _give_back_round(pair, side: str, op: str, memory: str):
    p, d, pid = pair.p, pair.d, pair.pid
    model = next(_case_models)
    owner_name, local_name = f"o{model}", f"l{model}"
    owner_seed, local_seed = model, model + 500
    # The memory given back is the owner's cache (side "owner") or the requester's (else).
    _blocks(p, owner_name, memory if side == "owner" else "registered", owner_seed, model)
    _blocks(d, local_name, memory if side == "requester" else "pool", local_seed)
    jobs = []
    for thread in (0, 1):
        if op == "pull":
            pull = {"op": "pull_blocks", "spec": key("BlocksCacheKey", pid, model),
                    "cache": local_name, "args": [_SRC[thread], _DST[thread]]}
            if side == "owner":  # checked; a requester-side check would poison freed memory
                pull["expect"] = {"seed": owner_seed, "shape": B_SHAPE,
                                  "tensors": [(i, i) for i in range(4)],
                                  "rows": list(zip(_SRC[thread], _DST[thread]))}
            jobs.append([pull])
        else:
            jobs.append([push_op(pid, model, local_name, thread)])
    d.call("start_loop", "g", jobs, max_s=120)
    wait_for(d, "g", 100)
    given = time.monotonic()
    gave = _give_back(p if side == "owner" else d, owner_name if side == "owner" else local_name,
                      memory)
    gave["t0"] = given
    time.sleep(0.3)
    result = d.call("stop_loop", "g", timeout=30)
    landed = None
    if side == "owner" and op == "push":
        landed = p.call("check_guard", owner_name)
    elif side == "requester" and op == "pull":
        landed = d.call("check_guard", local_name)
    assert_clean_loop(result, GONE_CODES, f"{side} {op} {memory}")
    if memory == "pool":
        assert gave["reused"], "the freed pool memory was not handed out again within 5 s"
    assert result["first_error"] is not None, "transfers went on succeeding after the give-back"
    assert result["max_call_s"] < SYNC_TIMEOUT_MS / 1000, result
    if landed is not None:
        assert landed == 0, f"{landed} bytes landed in memory given back"
    if side == "requester" and op == "push":
        assert_rows_are(p, owner_name, 4, _pushed_models(owner_seed, local_seed))
    return result, gave, landed
