"""Helpers shared by the benchmark suites: timing, the wrong-data error, the end of a run with
a prompt process."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..memory.device import synchronize


class DataMismatch(Exception):
    """A measured operation moved wrong bytes; its numbers must not be reported."""


def timed(fn: Callable[[], object], *devices: torch.device) -> float:
    """Seconds one call of `fn` takes, queued work on `devices` included."""
    for device in devices:
        synchronize(device)
    start = time.perf_counter()
    fn()
    for device in devices:
        synchronize(device)
    return time.perf_counter() - start


def median(values) -> float:
    return statistics.median(values)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def stop_prompt(conn, prompt, decoder) -> None:
    """Tell the prompt process (`multiprocessing.Process`, answering on `conn`) that the run is
    done, wait for it (killed after 30 s) and finalize the decoder."""
    try:
        conn.send("done")
    except OSError:
        pass
    prompt.join(30)
    if prompt.is_alive():
        prompt.kill()
    decoder.finalize()
