"""Smoke test of `python -m llm_datadist_torch.bench --suite local`: output shape, no speeds."""
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


def test_local_suite_json_lines():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run(
        [sys.executable, "-m", "llm_datadist_torch.bench", "--suite", "local", "--json",
         "--total-mib", "4", "--repeats", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
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
