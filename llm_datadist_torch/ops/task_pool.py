"""The threads that run `transfer_cache_async` tasks, shared by the engines of the process.

Daemon threads, started as tasks need them up to `MAX_WORKERS` and kept: a task costs no
thread start, and a task whose `LayerSynchronizer` never returns cannot hold up the exit of
the interpreter (`concurrent.futures` joins its threads at exit). Tasks beyond `MAX_WORKERS`
running at once wait in order.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

logger = logging.getLogger(__name__)

MAX_WORKERS = 8

_jobs: "queue.SimpleQueue" = queue.SimpleQueue()
_lock = threading.Lock()
_workers = 0
_idle = 0


def submit(job: Callable[[], None]) -> threading.Event:
    """Run `job` on a worker; the event is set when it has returned (or raised: logged)."""
    global _workers, _idle
    done = threading.Event()
    with _lock:
        _jobs.put((job, done))
        if _idle:
            _idle -= 1  # that worker takes this job
            return done
        if _workers < MAX_WORKERS:
            _workers += 1
            threading.Thread(target=_work, daemon=True,
                             name=f"llm_datadist_torch-task-{_workers}").start()
    return done


def _work() -> None:
    global _idle
    while True:
        job, done = _jobs.get()
        try:
            job()
        except BaseException:  # the job reports its own errors; never lose the worker
            logger.exception("transfer_cache_async task failed")
        finally:
            done.set()
        with _lock:
            _idle += 1
