"""The parent: starts the prefill and decode processes, relays their progress and results, and
never leaves one behind (every wait has a deadline; children are terminated, then killed)."""
from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .channel import Channels, poll
from .decode import run_decode
from .prefill import run_prefill
from .workload import DemoConfig

# The demo's model and caches are CPU tensors, whatever accelerator the host has; one torch
# thread per process (two busy processes share the cores, and the reference runs the same way).
CHILD_ENV = {"LLM_DATADIST_TORCH_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
STARTUP_S = 60.0       # spawning two interpreters and importing torch, on top of the run's timeout
EXIT_S = 10.0


class ChildFailed(RuntimeError):
    """A child raised (the message carries its traceback), died, or overran its deadline."""


def _watch_parent(parent_pid: int) -> None:
    """A child whose parent is gone (killed, say) exits instead of serving forever."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(3)


def _child_entry(name: str, target: Callable, args: tuple, channels: Channels, parent_pid: int) -> None:
    torch.set_num_threads(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    code = 0
    try:
        target(*args, channels)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, with its traceback
        channels.results.put(("error", name, traceback.format_exc()))
        code = 1
    # Flush what this process sent (results always; the rest only on success, when its reader is
    # still there), then skip interpreter teardown, which takes ~1 s with torch loaded. The
    # target has finalized its LLMDataDist already.
    for q in channels.all():
        q.close()
        if q is channels.results or code == 0:
            q.join_thread()
        else:
            q.cancel_join_thread()
    os._exit(code)


def _start(processes: List[multiprocessing.Process]) -> None:
    # A spawned child reads the environment at exec time: set it just for the start.
    saved = {key: os.environ.get(key) for key in CHILD_ENV}
    os.environ.update(CHILD_ENV)
    try:
        for process in processes:
            process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _stop(processes: List[multiprocessing.Process]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)


def run_disaggregated(config: DemoConfig, prompts: List[List[int]],
                      on_progress: Optional[Callable[[int, int], None]] = None
                      ) -> Tuple[dict, dict]:
    """Run prefill and decode in two spawned processes; their (prefill, decode) results."""
    ctx = multiprocessing.get_context("spawn")
    channels = Channels(ctx)
    processes: Dict[str, multiprocessing.Process] = {
        name: ctx.Process(target=_child_entry, name=f"demo-{name}", daemon=True,
                          args=(name, target, args, channels, os.getpid()))
        for name, target, args in (("prefill", run_prefill, (config, prompts)),
                                   ("decode", run_decode, (config,)))}
    deadline = time.monotonic() + config.timeout_s + STARTUP_S
    results: Dict[str, dict] = {}
    try:
        _start(list(processes.values()))
        while len(results) < len(processes):
            message = _next_message(channels, processes, results, deadline)
            if message[0] == "progress" and on_progress is not None:
                on_progress(message[1], message[2])
            elif message[0] == "result":
                results[message[1]] = message[2]
            elif message[0] == "error":
                errors = [message] + _later_errors(channels, processes)
                raise ChildFailed("\n".join(f"the {name} process failed:\n{text}"
                                            for _, name, text in errors))
        for name, process in processes.items():
            process.join(max(0.0, min(EXIT_S, deadline - time.monotonic())))
            if process.exitcode not in (0, None):
                raise ChildFailed(f"the {name} process exited with code {process.exitcode}")
    finally:
        _stop(list(processes.values()))
    return results["prefill"], results["decode"]


def _later_errors(channels: Channels, processes, grace_s: float = 1.0) -> list:
    """When one child fails the other often follows (a broken link); which one reports first is
    a race, so collect both tracebacks for a moment before giving up."""
    errors, deadline = [], time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            message = channels.results.get(timeout=0.05)
        except queue.Empty:
            if all(process.exitcode is not None for process in processes.values()):
                break
            continue
        if message[0] == "error":
            errors.append(message)
    return errors


def _next_message(channels: Channels, processes, results, deadline: float):
    """The next message from a child; ChildFailed when one died silently or time ran out."""
    while True:
        try:
            return channels.results.get(timeout=0.2)
        except queue.Empty:
            pass
        for name, process in processes.items():
            if name not in results and process.exitcode is not None:
                message = poll(channels.results)   # it may have answered just before exiting
                if message is not None:
                    return message
                raise ChildFailed(f"the {name} process exited with code {process.exitcode} "
                                  "without a result")
        if time.monotonic() > deadline:
            raise ChildFailed("the run did not finish in time (see --timeout)")
