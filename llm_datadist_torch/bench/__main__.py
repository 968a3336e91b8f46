"""`python -m llm_datadist_torch.bench [--suite NAME] [--json] [--total-mib N] [--repeats R]
[--tensors LIST] [--model-calls N] [--report [--out PREFIX] [--peers LIST]]`.

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
    "model": "llm_datadist_torch.bench.model",
    "calls": "llm_datadist_torch.bench.calls",
}
PEER_NAMES = ("nixl", "mooncake-te")  # keys of peers.PEERS, listed here to keep --help light


def _peer_list(text: str) -> List[str]:
    names = [] if text == "none" else [n for n in text.split(",") if n]
    unknown = sorted(set(names) - set(PEER_NAMES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {', '.join(unknown)} "
                                         f"(choose from {', '.join(PEER_NAMES)}, or none)")
    return names


def _counts(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas: {text}")
    return values


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
                             "transfer or model suite runs, else none)")
    model = parser.add_argument_group("model suite (one pull_blocks of k blocks of every tensor)")
    model.add_argument("--tensors", type=_counts, metavar="LIST",
                       help="tensor counts of the model-shaped caches (default: 2,64,160: the "
                            "reference, K and V of 32 and of 80 layers); the fits need two")
    model.add_argument("--model-calls", type=int, default=0, metavar="N",
                       help="timed calls per shape (default: 200 for k=1, 50 for k=16, fewer "
                            "where they would move over 2 GiB, at least 10)")
    args = parser.parse_args(argv)
    if args.total_mib < 1 or args.repeats < 1 or args.model_calls < 0:
        parser.error("--total-mib and --repeats must be at least 1, --model-calls at least 0")
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


def _model_peers(peer_names: List[str], args, rows: List[dict], statuses: List[dict]
                 ) -> List[dict]:
    """The peers on the model suite's shapes: their rows, stamped with the memcpy of the same
    shape from `rows`, and their fits; their statuses go into `statuses`."""
    from . import model, model_shapes, peers

    print(f"bench: running the peers {', '.join(peer_names)} on the model shapes",
          file=sys.stderr, flush=True)
    peer_rows, peer_statuses = peers.run_model(peer_names, model.shapes_of(args),
                                               args.model_calls)
    statuses += peer_statuses
    anchors = [row for row in rows if row.get("suite") == "model" and "p50_us" in row
               and row.get("transport") == "memcpy"]
    model_shapes.stamp_memcpy(anchors + peer_rows)
    return peer_rows + model_shapes.fit_rows(peer_rows)


def _report(args, names: List[str], command: str) -> int:
    from . import peers, plot  # noqa: F401 -- plot imports matplotlib only when drawing

    meta = {"command": command, **report.machine_info()}
    rows = _run_suites(names, args, quiet=True)
    if rows is None:
        return 1
    peer_names = args.peers if args.peers is not None else (
        list(PEER_NAMES) if {"transfer", "model"} & set(names) else [])
    statuses: List[dict] = []
    if peer_names and ("transfer" in names or "model" not in names):  # the transfer workload
        print(f"bench: running the peers {', '.join(peer_names)}", file=sys.stderr, flush=True)
        peer_rows, statuses = peers.run(peer_names, args.total_mib << 20, args.repeats,
                                        _ceiling(rows))
        rows += peer_rows
    if peer_names and "model" in names:
        rows += _model_peers(peer_names, args, rows, statuses)
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
    if names == ["model"]:
        title = "llm_datadist_torch: model-shaped pulls (k blocks of every tensor per call)"
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
