"""Benchmark rows as text: aligned terminal tables (or JSON lines with `--json`), and the
`--report` files: `<out>.json` (a `{"meta": ...}` line, then one row per line) and `<out>.md`
(the command, date and machine, the peers' status, the model suite's side-by-side tables, see
`model_report`, and every row)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Dict, List, TextIO, Tuple

_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def human_bytes(nbytes: int) -> str:
    for size, unit in _UNITS:
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size} {unit}"
    for size, unit in _UNITS:
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def format_value(key: str, value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) and key.endswith("_bytes"):
        return human_bytes(value)
    if isinstance(value, float):
        digits = 0 if abs(value) >= 100 else 2 if abs(value) >= 1 else 3
        return f"{value:.{digits}f}"
    return str(value)


def _groups(rows: List[dict]) -> List[List[dict]]:
    """Rows with the same fields share one table (suites mix throughput and latency rows)."""
    tables: Dict[Tuple[str, ...], List[dict]] = {}
    for row in rows:
        tables.setdefault(tuple(row), []).append(row)
    return list(tables.values())


def _table(rows: List[dict], stream: TextIO) -> None:
    columns = list(rows[0])
    cells = [[format_value(key, row.get(key)) for key in columns] for row in rows]
    numeric = [all(isinstance(row.get(key), (int, float)) for row in rows) for key in columns]
    widths = [max(len(key), *(len(line[i]) for line in cells)) for i, key in enumerate(columns)]

    def line(values) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, right in zip(values, widths, numeric)).rstrip()

    print(line(columns), file=stream)
    for values in cells:
        print(line(values), file=stream)


def emit(rows: List[dict], as_json: bool = False, stream: TextIO = sys.stdout) -> None:
    """Print `rows`: one table per set of fields, or one JSON object per line."""
    if as_json:
        for row in rows:
            print(json.dumps(row), file=stream)
        stream.flush()
        return
    for index, group in enumerate(_groups(rows)):
        if index:
            print(file=stream)
        _table(group, stream)
    stream.flush()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        with open("/proc/meminfo") as meminfo:
            kib = int(meminfo.readline().split()[1])  # MemTotal
        return f"{kib / (1 << 20):.1f}"
    except (OSError, ValueError, IndexError):
        return "unknown"


def machine_info() -> dict:
    """What the numbers depend on besides the code: CPUs usable here (`nproc`), model, memory,
    versions, copy threads, and the load when the run started (the host may be shared)."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "copy_threads": os.environ.get("LLM_DATADIST_TORCH_COPY_THREADS", "2 (default)"),
        "load_average": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def write_json(path: str, meta: dict, rows: List[dict]) -> None:
    with open(path, "w") as out:
        out.write(json.dumps({"meta": meta}) + "\n")
        for row in rows:
            out.write(json.dumps(row) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(rows: List[dict], out: TextIO) -> None:
    columns = list(rows[0])
    numeric = [all(isinstance(row.get(key), (int, float)) for row in rows) for key in columns]
    print("| " + " | ".join(columns) + " |", file=out)
    print("|" + "|".join("---:" if right else "---" for right in numeric) + "|", file=out)
    for row in rows:
        print("| " + " | ".join(_cell(format_value(key, row.get(key))) for key in columns) + " |",
              file=out)


MACHINE_LABELS = (("cpu", "CPU model (/proc/cpuinfo)"), ("nproc", "CPUs usable (`nproc`)"),
                  ("memory_gib", "memory (GiB)"), ("kernel", "kernel"), ("python", "Python"),
                  ("torch", "torch"), ("torch_threads", "torch intra-op threads"),
                  ("copy_threads", "`LLM_DATADIST_TORCH_COPY_THREADS`"),
                  ("load_average", "load average at start (1 / 5 / 15 min)"),
                  ("load_average_end", "load average at end"))


def write_markdown(path: str, meta: dict, rows: List[dict], peers: List[dict],
                   image: str = "", notes: List[str] = ()) -> None:
    """`meta` has "command" and machine_info(); `image` is the PNG's path relative to `path`."""
    with open(path, "w") as out:
        print("# llm_datadist_torch benchmark report\n", file=out)
        print(f"Made on {meta['date']} by\n\n```bash\n{meta['command']}\n```\n", file=out)
        print("| machine | |\n|---|---|", file=out)
        for key, label in MACHINE_LABELS:
            if key in meta:
                print(f"| {label} | {_cell(str(meta[key]))} |", file=out)
        print(file=out)
        if image:
            print(f"![GB/s against block size]({image})\n", file=out)
        print("GB/s is 1e9 bytes per second. `memcpy_gbps` is one `copy_` of the same number of "
              "bytes between pre-touched buffers, measured in the same run; `ratio` is "
              "`gbps / memcpy_gbps`. Every transfer moves `total_bytes` in one call "
              "(`pull_cache`: one call per block), the median of the timed calls is shown.\n",
              file=out)
        for note in notes:
            print(f"{note}\n", file=out)
        if peers:
            print("## Peers\n", file=out)
            print("Other engines driven directly, a server and a client process on this host. "
                  "Workload `transfer`: the transfer suite's `pull_blocks` workload (same block "
                  "sizes, random block order, total bytes), the client READs every block; the "
                  "bytes of the first read are checked. Their rows have `suite` = `peer`; their "
                  "`memcpy_gbps` is the transfer suite's (median per block size) from this run. "
                  "Workload `model`: the model suite's shapes (see below), rows with `suite` = "
                  "`model`.\n", file=out)
            _markdown_table(peers, out)
            print(file=out)
        from . import model_report  # it imports this module

        model_report.write(rows, out)
        calls = [row for row in rows if row.get("suite") == "calls"]
        if calls:
            from .calls import __doc__ as about
            print("## Cost per call\n", file=out)
            print(about.split("\n\n", 1)[1].strip() + "\n", file=out)
            for group in _groups(calls):
                _markdown_table(group, out)
                print(file=out)
        print("## Numbers\n", file=out)
        for group in _groups(rows):
            _markdown_table(group, out)
            print(file=out)
