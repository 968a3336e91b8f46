"""`python -m llm_datadist_torch.bench [--suite NAME] [--json] [--total-mib N] [--repeats R]`.

Exit status: 0 when every suite ran, 1 when a suite moved wrong bytes (`DataMismatch`).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from . import report
from .common import DataMismatch

# Suite name -> module with `run(args) -> list[dict]`; imported only when selected.
SUITES = {
    "local": "llm_datadist_torch.bench.local_ops",
    "transfer": "llm_datadist_torch.bench.transfer",
}


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
    args = parser.parse_args(argv)
    if args.total_mib < 1 or args.repeats < 1:
        parser.error("--total-mib and --repeats must be at least 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    names = args.suite or list(SUITES)
    for index, name in enumerate(names):
        suite = importlib.import_module(SUITES[name])
        try:
            rows = suite.run(args)
        except DataMismatch as exc:
            print(f"bench {name}: wrong data: {exc}", file=sys.stderr)
            return 1
        if index and not args.json:
            print()
        report.emit(rows, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
