"""Smoke tests of `python -m llm_datadist_torch.bench`: output shape, no speeds."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from llm_datadist_torch.bench import __main__ as bench_main
from llm_datadist_torch.bench import local_ops
from llm_datadist_torch.cache_manager import CacheManager

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("suite", "op", "block_bytes", "blocks", "total_bytes", "gbps", "memcpy_gbps", "ratio")
OPS = {"copy_blocks", "swap_blocks_d2h", "swap_blocks_h2d"}


def bench_rows(suite: str) -> list:
    """The JSON rows of a small run of `suite` (every byte moved is still checked)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run(
        [sys.executable, "-m", "llm_datadist_torch.bench", "--suite", suite, "--json",
         "--total-mib", "4", "--repeats", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_local_suite_json_lines():
    rows = bench_rows("local")
    for row in rows:
        assert all(key in row for key in REQUIRED), row
        assert row["suite"] == "local"
        assert row["gbps"] > 0 and row["memcpy_gbps"] > 0 and row["ratio"] > 0, row
        assert row["total_bytes"] == row["blocks"] * row["block_bytes"], row
    assert {(row["op"], row["block_bytes"]) for row in rows} == {
        (op, block) for op in OPS for block in local_ops.BLOCK_SIZES}


def test_wrong_bytes_fail_the_run(monkeypatch, capsys):
    """A copy that moves nothing must be caught by the verification, not reported as fast."""
    monkeypatch.setattr(CacheManager, "copy_blocks", lambda self, cache, info: None)
    code = bench_main.main(["--suite", "local", "--json", "--total-mib", "4", "--repeats", "1"])
    assert code == 1
    assert "wrong data" in capsys.readouterr().err


def test_transfer_suite_json_lines():
    rows = bench_rows("transfer")
    rated = [row for row in rows if "gbps" in row]
    for row in rated:
        assert all(key in row for key in ("transport", "op", "block_bytes", "gbps", "memcpy_gbps")), row
        assert row["gbps"] > 0 and row["memcpy_gbps"] > 0, row
    transports = {"shm", "cma", "local", "staged"}
    try:  # the bench's own test: the package imports and loads its libraries
        importlib.import_module("mooncake.engine")
        transports.add("mooncake")
    except ImportError:
        pass
    assert {row["transport"] for row in rated} == transports
    assert {(row["transport"], row["op"]) for row in rows if "p50_us" in row} == {
        (transport, "pull_blocks_1x16KiB_latency") for transport in transports}
    assert {row["transport"] for row in rows if row["op"] == "link_clusters"} == (
        {"zmq", "mooncake"} & (transports | {"zmq"}))


def test_calls_suite_json_lines():
    """One row per measurement; the keyed pulls' bytes and key releases are checked by the
    suite itself (a failure is a non-zero exit)."""
    rows = bench_rows("calls")
    by_op = {row["op"]: row for row in rows}
    assert set(by_op) == {"ping", "pull_cache by id (answer kept)", "pull_cache by CacheKey",
                          "memcpy of the pushed bytes", "transfer_cache_async of 32 layers"}
    for row in rows:
        assert row["suite"] == "calls" and row["tensors"] == 64, row
        assert 0 < row["p50_us"] <= row["p99_us"], row
    assert "per_layer_us" in by_op["transfer_cache_async of 32 layers"]
