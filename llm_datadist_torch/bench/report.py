"""Print benchmark rows: aligned tables by default, one JSON object per line with `--json`."""
from __future__ import annotations

import json
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
    """Rows with the same fields share one table (suites mix throughput and latency rows)."""
    if as_json:
        for row in rows:
            print(json.dumps(row), file=stream)
        stream.flush()
        return
    tables: Dict[Tuple[str, ...], List[dict]] = {}
    for row in rows:
        tables.setdefault(tuple(row), []).append(row)
    for index, group in enumerate(tables.values()):
        if index:
            print(file=stream)
        _table(group, stream)
    stream.flush()
