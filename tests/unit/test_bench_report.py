"""`python -m llm_datadist_torch.bench --report`: the table, PNG and JSON writers on synthetic
rows, the peer harness on a fake engine, and the CLI on a tiny run. No speed assertions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_datadist_torch.bench import peers, plot, report
from llm_datadist_torch.bench.peers import _workload

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BLOCKS = (16 << 10, 128 << 10, 1 << 20, 2 << 20)
ROWS = (
    [{"suite": "transfer", "transport": transport, "op": op, "block_bytes": block,
      "total_bytes": 64 << 20, "gbps": 1.5 + index, "memcpy_gbps": 12.25, "ratio": 0.123}
     for transport in ("shm", "cma") for op in ("pull_blocks", "pull_cache")
     for index, block in enumerate(BLOCKS)]
    + [{"suite": "peer", "transport": "nixl-ucx", "op": "pull_blocks", "block_bytes": block,
        "total_bytes": 64 << 20, "gbps": 0.75, "memcpy_gbps": 12.25, "ratio": 0.061}
       for block in BLOCKS]
    + [{"suite": "local", "op": "copy_blocks", "block_bytes": block, "blocks": 8,
        "total_bytes": 8 * block, "gbps": 9.5, "memcpy_gbps": 11.0, "ratio": 0.864,
        "device": "cpu"} for block in BLOCKS]
    + [{"suite": "transfer", "transport": "shm", "op": "pull_blocks_1x16KiB_latency",
        "block_bytes": 16 << 10, "p50_us": 444.0, "p99_us": 869.5},
       {"suite": "transfer", "transport": "zmq", "op": "link_clusters", "ms": 2.87}]
)
STATUSES = [{"peer": "nixl", "transport": "nixl-ucx", "version": "1.5.1", "setup": "UCX_TLS=x",
             "status": "ok", "detail": "first read, connect included: 52.9 ms"},
            {"peer": "mooncake-te", "transport": "mooncake-te-tcp", "version": "", "setup": "tcp",
             "status": "not installed", "detail": "pip install a | b"}]


def _meta():
    return {"command": "python -m llm_datadist_torch.bench --report", **report.machine_info()}


def test_markdown_has_command_machine_and_every_row(tmp_path):
    path = tmp_path / "bench.md"
    report.write_markdown(str(path), _meta(), ROWS, STATUSES, image="bench.png")
    text = path.read_text()
    assert "python -m llm_datadist_torch.bench --report" in text
    assert "CPUs usable (`nproc`)" in text and torch.__version__ in text
    assert "![GB/s against block size](bench.png)" in text
    lines = text.splitlines()
    for row in ROWS + STATUSES:
        cells = [report.format_value(key, value).replace("|", "\\|") for key, value in row.items()]
        assert "| " + " | ".join(cells) + " |" in lines, row


def test_json_lines_meta_then_rows(tmp_path):
    path = tmp_path / "bench.json"
    meta = _meta()
    report.write_json(str(path), meta, ROWS)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"meta": meta}
    assert lines[1:] == ROWS


def test_png_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    plot.write_png(ROWS, str(path), "title", "subtitle")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_png_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(plot.PlotUnavailable, match="pip install matplotlib"):
        plot.write_png(ROWS, str(tmp_path / "bench.png"), "title")
    assert not (tmp_path / "bench.png").exists()


# A fake peer engine for the harness: the client "reads" from its own copy of the server's
# bytes, or, with FAKE_PEER_MODE=wrong, moves nothing. The spawned processes import this module.
LABEL = "fake-peer"
DISTRIBUTION = "no-such-distribution"
IMPORT = "torch"
INSTALL = "pip install fake-peer"


def setup():
    return "in-process copy"


class Server:
    def __init__(self, tensor):
        pass

    def endpoint(self):
        return None

    def on_message(self, message):
        pass

    def close(self):
        pass


class Client:
    def __init__(self, tensor, endpoint, conn):
        self.tensor = tensor
        self.source = _workload.source_bytes(tensor.numel())

    def reader(self, src, dst, length):
        def read():
            if os.environ.get("FAKE_PEER_MODE") == "wrong":
                return
            for s, d in zip(src, dst):
                self.tensor[d:d + length].copy_(self.source[s:s + length])
        return read

    def close(self):
        pass


@pytest.mark.multiprocess
def test_peer_harness_statuses(monkeypatch):
    module = sys.modules[__name__]
    monkeypatch.setitem(peers.PEERS, "fake", __name__)
    total = 4 << 20
    rows, statuses = peers.run(["fake"], total, 1, {16 << 10: 10.0}, timeout_s=120)
    assert [s["status"] for s in statuses] == ["ok"], statuses
    assert {row["block_bytes"] for row in rows} == set(BLOCKS)
    for row in rows:
        assert row["suite"] == "peer" and row["transport"] == LABEL and row["op"] == "pull_blocks"
        assert row["total_bytes"] == total and row["gbps"] > 0 and row["memcpy_gbps"] > 0
    assert [r["memcpy_gbps"] for r in rows if r["block_bytes"] == 16 << 10] == [10.0]

    monkeypatch.setenv("FAKE_PEER_MODE", "wrong")  # inherited by the spawned processes
    rows, statuses = peers.run(["fake"], total, 1, {}, timeout_s=120)
    assert rows == [] and statuses[0]["status"] == "wrong data", statuses

    monkeypatch.setattr(module, "IMPORT", "no_such_module_for_bench_peers")
    rows, statuses = peers.run(["fake"], total, 1, {})
    assert rows == [] and statuses[0]["status"] == "not installed"
    assert statuses[0]["detail"] == INSTALL


def test_report_cli_tiny_run(tmp_path):
    out = tmp_path / "sub" / "bench"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    args = ["--report", "--suite", "local", "--total-mib", "4", "--repeats", "1", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "llm_datadist_torch.bench", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "copy_blocks" in done.stdout and "memcpy_gbps" in done.stdout  # the terminal table
    markdown = (tmp_path / "sub" / "bench.md").read_text()
    assert "python -m llm_datadist_torch.bench " + " ".join(args) in markdown
    lines = [json.loads(line)
             for line in (tmp_path / "sub" / "bench.json").read_text().splitlines()]
    assert "meta" in lines[0] and len(lines) == 1 + 3 * len(BLOCKS)
    assert all(row["suite"] == "local" for row in lines[1:])
    png = tmp_path / "sub" / "bench.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists() and "pip install matplotlib" in markdown
    else:
        assert png.read_bytes().startswith(PNG_SIGNATURE)
