"""Soak: many link/unlink cycles and thousands of pulls between two processes leave both as
they were: the same open fds, threads (OS threads, native ones included) and /dev/shm files, and
RSS within 10 % of what it was after a warm-up. Pulls alternate between pool memory (shm) and
registered memory (cma) and are checked byte for byte. Run with `pytest -s` for the figures.
"""
from __future__ import annotations

import time

import pytest

from agents import key
from checks import B_SHAPE, Model, start_pair
from helpers import assert_no_shm_files

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(180)]

LINK_CYCLES = 200
PULLS = 2000              # half through shm (pool memory), half through cma (registered memory)
ROUNDS = 10               # byte checks: after every round of PULLS // ROUNDS pulls
RSS_TOLERANCE = 0.10
SEEDS = {"pool": 31, "reg": 32}
DSEED = 39


def _setup(pair) -> None:
    pair.p.call("allocate", "pool", 4, B_SHAPE, seed=SEEDS["pool"], blocks=True, model_id=0)
    pair.p.call("register", "reg", 4, B_SHAPE, seed=SEEDS["reg"], model_id=1)
    pair.d.call("allocate", "dpool", 4, B_SHAPE, seed=DSEED, blocks=True)
    pair.d.call("allocate", "dreg", 4, B_SHAPE, seed=DSEED, blocks=True)


def _pull_round(pair, count: int, round_index: int) -> list:
    """`count` pulls of each kind with this round's block mapping, then both destinations are
    checked byte for byte; the pull times in ms."""
    blocks = B_SHAPE[0]
    src = [(round_index + k) % blocks for k in range(3)]
    dst = [(round_index * 3 + 5 + k) % blocks for k in range(3)]
    times = []
    for kind, model, local in (("pool", 0, "dpool"), ("reg", 1, "dreg")):
        pair.d.call("fill", local, DSEED)
        times += pair.d.call("pull_blocks_timed", key("BlocksCacheKey", pair.pid, model), local,
                             src, dst, count, timeout=120)
        want, have = Model(DSEED, 4, B_SHAPE), Model(SEEDS[kind], 4, B_SHAPE)
        for i in range(4):
            for s, d in zip(src, dst):
                want.t[i][d] = have.t[i][s]
        want.check(pair.d, local)
    return times


def _stats(pair) -> dict:
    return {"owner": pair.p.call("proc_stats"), "requester": pair.d.call("proc_stats")}


def _settled(pair, baseline: dict, timeout_s: float = 10.0) -> dict:
    """The stats once fds, threads and shm files are back to the baseline (short-lived threads,
    sockets closing), or whatever they are after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = _stats(pair)
        same = all(now[side][field] == baseline[side][field]
                   for side in now for field in ("fds", "tasks", "threads", "shm"))
        if same or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def _figures(before: dict, after: dict) -> str:
    lines = ["side      | fds        | OS threads | py threads | RSS MiB                   | /dev/shm files",
             "----------|------------|------------|------------|---------------------------|---------------"]
    for side in ("owner", "requester"):
        b, a = before[side], after[side]
        growth = (a["rss_kb"] / b["rss_kb"] - 1) * 100
        rss = f"{b['rss_kb'] / 1024:.1f} -> {a['rss_kb'] / 1024:.1f} ({growth:+.1f} %)"
        lines.append(f"{side:9} | {b['fds']:3} -> {a['fds']:3} | {b['tasks']:3} -> {a['tasks']:3} "
                     f"| {b['threads']:3} -> {a['threads']:3} | {rss:25} | "
                     f"{len(b['shm'])} -> {len(a['shm'])}")
    return "\n".join(lines)


def test_link_cycles_and_pulls_leave_no_trace(harness):
    started = time.monotonic()
    pair = start_pair(harness)
    _setup(pair)
    # Warm-up: whatever is made once per process (transports, mappings, sockets, pools of
    # threads, allocator arenas) exists before the baseline is taken.
    assert pair.d.call("unlink", pair.pid, pair.port)["overall"] == 0
    pair.d.call("link_cycles", pair.pid, pair.port, 20, timeout=120)
    assert pair.d.call("link", pair.pid, pair.port)["overall"] == 0
    for round_index in range(2):
        _pull_round(pair, 50, round_index)
    baseline = _settled(pair, _stats(pair), 1.0)

    soak_started = time.monotonic()
    assert pair.d.call("unlink", pair.pid, pair.port)["overall"] == 0
    link_ms = pair.d.call("link_cycles", pair.pid, pair.port, LINK_CYCLES, timeout=300)
    assert pair.d.call("link", pair.pid, pair.port)["overall"] == 0
    # (The requester may hold a few fds fewer here: a link opens its transports at its first pull.)
    after_links = _settled(pair, baseline, 1.0)
    pull_ms = []
    for round_index in range(ROUNDS):
        pull_ms += _pull_round(pair, PULLS // ROUNDS // 2, round_index)
    soak_s = time.monotonic() - soak_started
    after = _settled(pair, baseline)

    link_ms.sort()
    pull_ms.sort()
    print(f"\n\nsoak: {LINK_CYCLES} link/unlink cycles (link_clusters p50 "
          f"{link_ms[len(link_ms) // 2]:.1f} ms, max {link_ms[-1]:.1f} ms), then {len(pull_ms)} "
          f"pulls (shm + cma, p50 {pull_ms[len(pull_ms) // 2]:.3f} ms, max {pull_ms[-1]:.1f} ms), "
          f"{soak_s:.1f} s; the test {time.monotonic() - started:.1f} s in all\n"
          f"after the link cycles:\n{_figures(baseline, after_links)}\n"
          f"after the pulls too:\n{_figures(baseline, after)}")
    assert len(pull_ms) == PULLS
    for side in ("owner", "requester"):
        b, a = baseline[side], after[side]
        for field in ("fds", "tasks", "threads", "shm"):
            assert a[field] == b[field], f"{side}: {field} {b[field]} -> {a[field]}"
        growth = a["rss_kb"] / b["rss_kb"] - 1
        assert abs(growth) <= RSS_TOLERANCE, f"{side}: RSS {b['rss_kb']} -> {a['rss_kb']} KiB"
    pair.d.call("unlink", pair.pid, pair.port)
    for child in (pair.p, pair.d):
        child.finish()
        assert_no_shm_files(child.pid)
