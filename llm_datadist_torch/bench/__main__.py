"""`python -m llm_datadist_torch.bench [--suite NAME] [--json] [--total-mib N] [--repeats R]
[--report [--out PREFIX] [--peers LIST]]`.

Exit status: 0 when every suite ran, 1 when a suite or a peer moved wrong bytes (`DataMismatch`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import statistics
import sys
from typing import Dict, List, Optional

from . import report
from .common import DataMismatch

# Suite name -> module with `run(args) -> list[dict]`; imported only when selected.
SUITES = {
    "local": "llm_datadist_torch.bench.local_ops",
    "transfer": "llm_datadist_torch.bench.transfer",
}
PEER_NAMES = ("nixl", "mooncake-te")  # keys of peers.PEERS, listed here to keep --help light


def _peer_list(text: str) -> List[str]:
    names = [] if text == "none" else [n for n in text.split(",") if n]
    unknown = sorted(set(names) - set(PEER_NAMES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {', '.join(unknown)} "
                                         f"(choose from {', '.join(PEER_NAMES)}, or none)")
    return names


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llm_datadist_torch.bench",
        description="Throughput of block copies and transfers next to memcpy of the same bytes, "
                    "measured in the same run (GB/s = 1e9 bytes/s).")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES),
                        help="suite to run; repeat for several (default: all)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per measurement per line")
    parser.add_argument("--total-mib", type=int, default=128,
                        help="MiB moved by every timed call (%(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per measurement; the median is reported (%(default)s)")
    parser.add_argument("--report", action="store_true",
                        help="also write PREFIX.png (GB/s against block size), PREFIX.md and "
                             "PREFIX.json, and run the peer engines next to the transfer suite")
    parser.add_argument("--out", default=os.path.join("docs", "bench"), metavar="PREFIX",
                        help="path prefix of the report files (%(default)s)")
    parser.add_argument("--peers", type=_peer_list, metavar="LIST",
                        help="with --report: comma-separated peer engines to run on the same "
                             f"workload ({','.join(PEER_NAMES)}) or none (default: all when the "
                             "transfer suite runs, else none)")
    args = parser.parse_args(argv)
    if args.total_mib < 1 or args.repeats < 1:
        parser.error("--total-mib and --repeats must be at least 1")
    return args


def _run_suites(names: List[str], args, quiet: bool) -> Optional[List[dict]]:
    """Rows of every suite, or None after a suite moved wrong bytes (said on stderr)."""
    rows = []
    for name in names:
        if quiet:
            print(f"bench: running the {name} suite", file=sys.stderr, flush=True)
        suite = importlib.import_module(SUITES[name])
        try:
            rows += suite.run(args)
        except DataMismatch as exc:
            print(f"bench {name}: wrong data: {exc}", file=sys.stderr)
            return None
    return rows


def _ceiling(rows: List[dict]) -> Dict[int, float]:
    """The transfer suite's memcpy GB/s per block size, for the peers' rows."""
    values: Dict[int, List[float]] = {}
    for row in rows:
        if row.get("suite") == "transfer" and "memcpy_gbps" in row:
            values.setdefault(row["block_bytes"], []).append(row["memcpy_gbps"])
    return {block: statistics.median(v) for block, v in values.items()}


def _report(args, names: List[str], command: str) -> int:
    from . import peers, plot  # noqa: F401 -- plot imports matplotlib only when drawing

    meta = {"command": command, **report.machine_info()}
    rows = _run_suites(names, args, quiet=True)
    if rows is None:
        return 1
    peer_names = args.peers if args.peers is not None else (
        list(PEER_NAMES) if "transfer" in names else [])
    statuses: List[dict] = []
    if peer_names:
        print(f"bench: running the peers {', '.join(peer_names)}", file=sys.stderr, flush=True)
        peer_rows, statuses = peers.run(peer_names, args.total_mib << 20, args.repeats,
                                        _ceiling(rows))
        rows += peer_rows
    meta["load_average_end"] = report.machine_info()["load_average"]

    report.emit(rows, as_json=args.json)
    if statuses and not args.json:
        print()
        report.emit(statuses)

    prefix = args.out
    if os.path.dirname(prefix):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
    png, md, js = prefix + ".png", prefix + ".md", prefix + ".json"
    notes, image = [], ""
    title = (f"llm_datadist_torch: GB/s against block size, "
             f"{report.human_bytes(args.total_mib << 20)} per call, median of {args.repeats}")
    subtitle = (f"{meta['cpu']}, nproc {meta['nproc']}, torch {meta['torch']}, {meta['date']}, "
                f"load average {meta['load_average'].split()[0]} at start")  # a shared host?
    try:
        plot.write_png(rows, png, title, subtitle)
        image = os.path.relpath(png, os.path.dirname(md) or ".")
    except plot.PlotUnavailable as exc:
        print(f"bench: no plot: {exc}", file=sys.stderr)
        notes.append(f"No plot: {exc}.")
    report.write_markdown(md, meta, rows, statuses, image=image, notes=notes)
    report.write_json(js, meta, rows)
    print(f"bench: wrote {', '.join(p for p in (png if image else '', md, js) if p)}",
          file=sys.stderr)
    wrong = [s for s in statuses if s["status"] == "wrong data"]
    for status in wrong:
        print(f"bench peer {status['peer']}: wrong data: {status['detail']}", file=sys.stderr)
    return 1 if wrong else 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    names = args.suite or list(SUITES)
    if args.report:
        return _report(args, names, "python -m llm_datadist_torch.bench " + shlex.join(argv))
    for index, name in enumerate(names):
        rows = _run_suites([name], args, quiet=False)
        if rows is None:
            return 1
        if index and not args.json:
            print()
        report.emit(rows, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
