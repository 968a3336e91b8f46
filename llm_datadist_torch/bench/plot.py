"""The report's PNG: GB/s against block size, one line per transport and op, memcpy on top; and
the model suite's p50 per call against the tensor count.

matplotlib (Agg, no display needed) is imported only here; without it `write_png` raises
`PlotUnavailable` saying how to install it, and the report goes on without the picture.
"""
from __future__ import annotations

import statistics
from functools import partial
from typing import Callable, Dict, List, Tuple

from .report import human_bytes

INSTALL = 'pip install matplotlib, or pip install -e ".[bench]"'
# Fixed colours, so a transport keeps its colour from one report to the next.
COLOURS = {"local": "tab:blue", "shm": "tab:green", "cma": "tab:orange", "mooncake": "tab:red",
           "staged": "tab:olive", "nixl-ucx": "tab:purple", "mooncake-te-tcp": "tab:brown"}
OTHER_COLOURS = ["tab:pink", "tab:cyan", "tab:gray"]
STYLES = ["-", "--", ":", "-."]  # per op, in order of appearance


class PlotUnavailable(RuntimeError):
    pass


def _panels(rows: List[dict]) -> List[Tuple[str, Callable, List[dict]]]:
    """(title, drawing function, rows) per panel: transfers between clusters (our transports and
    the peers), the copies on one instance when the local suite ran, and per k the model
    suite's latency against the tensor count."""
    rated = [row for row in rows if "gbps" in row and "block_bytes" in row]
    transfer = [row for row in rated if row.get("suite") in ("transfer", "peer")]
    local = [row for row in rated if row.get("suite") == "local"]
    model = [row for row in rows if row.get("suite") == "model" and "p50_us" in row]
    panels = []
    if transfer:
        panels.append(("pulls between two clusters (peer engines: same pull_blocks workload)",
                       partial(_draw, key="transport"), transfer))
    if local:
        panels.append(("copy_blocks / swap_blocks on one instance", partial(_draw, key="device"),
                       local))
    for k in sorted({row["blocks"] for row in model}):
        panels.append((f"model-shaped pulls: {k} block{'s' if k > 1 else ''} of every tensor "
                       "per call (p50)", _draw_model, [r for r in model if r["blocks"] == k]))
    return panels


def _draw_model(axes, title: str, rows: List[dict]) -> None:
    """p50 µs per call against the tensor count (log-log), a line per transport and block size:
    colour per transport, style per block size; memcpy black."""
    lines: Dict[Tuple[str, int], List[Tuple[int, float]]] = {}
    for row in rows:
        lines.setdefault((row["transport"], row["block_bytes"]), []).append(
            (row["tensors"], row["p50_us"]))
    blocks = sorted({block for _, block in lines})
    spare = iter(OTHER_COLOURS * len(lines))
    colours: Dict[str, str] = {"memcpy": "black"}
    ours = ["memcpy", "shm", "cma"]
    order = ours + sorted({label for label, _ in lines} - set(ours))
    for (label, block), points in sorted(lines.items(),
                                         key=lambda item: (item[0][1], order.index(item[0][0]))):
        points.sort()
        colour = colours.setdefault(label, COLOURS.get(label) or next(spare))
        axes.plot([p[0] for p in points], [p[1] for p in points],
                  STYLES[blocks.index(block) % len(STYLES)], color=colour, marker="o",
                  markersize=4, linewidth=2 if label in ("shm", "cma") else 1.3,
                  label=f"{label}  {human_bytes(block)} blocks")
    tensors = sorted({row["tensors"] for row in rows})
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(tensors, [str(t) for t in tensors])
    axes.minorticks_off()
    axes.set_xlabel("tensors per cache (K and V per layer; log scale)")
    axes.set_ylabel("p50 per call (µs; log scale)")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _draw(axes, title: str, rows: List[dict], key: str) -> None:
    lines: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
    ceiling: Dict[int, List[float]] = {}
    for row in rows:
        label = row.get(key) or row.get("suite", "")
        lines.setdefault((label, row["op"]), []).append((row["block_bytes"], row["gbps"]))
        ceiling.setdefault(row["block_bytes"], []).append(row["memcpy_gbps"])
    ops = list(dict.fromkeys(op for _, op in lines))
    labels = list(dict.fromkeys(label for label, _ in lines))
    spare = iter(OTHER_COLOURS * len(labels))
    colours = {label: COLOURS.get(label) or next(spare) for label in labels}
    single = len(labels) == 1  # one device: colour by op instead
    # The first op (pull_blocks, the headline) drawn bold and listed first; the others lighter.
    for (label, op), points in sorted(lines.items(), key=lambda item: ops.index(item[0][1])):
        points.sort()
        first = ops.index(op) == 0
        colour = f"C{ops.index(op)}" if single else colours[label]
        style = "-" if single else STYLES[ops.index(op) % len(STYLES)]
        peer = any(row.get("suite") == "peer" and row.get(key) == label for row in rows)
        axes.plot([p[0] for p in points], [p[1] for p in points], style, color=colour,
                  marker="s" if peer else "o", markersize=5 if first or single else 3.5,
                  linewidth=2 if first or single else 1.2, alpha=1 if first or single else 0.75,
                  label=op if single else f"{label}  {op}" + ("  (peer engine)" if peer else ""))
    blocks = sorted(ceiling)
    axes.plot(blocks, [statistics.median(ceiling[b]) for b in blocks], color="black",
              linewidth=2.5, linestyle=(0, (6, 3)), zorder=1,
              label="memcpy ceiling (same bytes, same run)")
    axes.set_xscale("log", base=2)
    axes.set_xticks(blocks, [human_bytes(b) for b in blocks])
    axes.minorticks_off()
    axes.set_ylim(bottom=0)
    axes.set_xlabel("block size (bytes per block and tensor; log scale)")
    axes.set_ylabel("throughput (GB/s, 1e9 bytes/s)")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def write_png(rows: List[dict], path: str, title: str, subtitle: str = "") -> None:
    """Draw the throughput rows of `rows` into the PNG file `path`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as exc:
        raise PlotUnavailable(f"matplotlib is not installed ({INSTALL})") from exc
    panels = _panels(rows)
    if not panels:
        raise PlotUnavailable("no throughput rows to draw")
    figure, axes = pyplot.subplots(len(panels), 1, figsize=(10, 4.8 * len(panels)), squeeze=False)
    for ax, (panel_title, draw, panel_rows) in zip(axes[:, 0], panels):
        draw(ax, panel_title, panel_rows)
    figure.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
