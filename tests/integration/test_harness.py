"""The harness itself: tracebacks come back, deadlines hold, children never outlive a test.

These children do not import torch, so they start in a fraction of a second.
"""
import os
import signal
import time

import pytest

from harness import ChildDied, ChildError, ChildTimeout, Harness, serve

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]


def crashes_at_start(conn, message):
    raise ValueError(message)


def echoes(conn):
    serve(conn, {"echo": lambda value: value, "fail": lambda: 1 / 0,
                 "sleep": time.sleep, "pid": os.getpid})


def exits_silently(conn):
    os._exit(7)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_crash_comes_back_with_the_child_traceback(harness):
    child = harness.spawn(crashes_at_start, "boom 42")
    with pytest.raises(ChildError) as info:
        child.recv(timeout=30)
    assert info.value.exc_type == "ValueError" and "boom 42" in str(info.value)
    assert "crashes_at_start" in info.value.child_traceback  # the child's frames, not ours
    assert child.join(10) == 1


def test_calls_results_and_errors(harness):
    child = harness.spawn(echoes)
    assert child.call("echo", {"a": [1, 2]}, timeout=30) == {"a": [1, 2]}
    with pytest.raises(ChildError) as info:
        child.call("fail")
    assert info.value.exc_type == "ZeroDivisionError" and "<lambda>" in info.value.child_traceback
    assert child.call("echo", 5) == 5  # still serving
    assert child.finish() == 0


def test_deadlines_and_cleanup():
    with Harness() as h:
        child = h.spawn(echoes)
        child.call("echo", 0, timeout=30)
        start = time.monotonic()
        with pytest.raises(ChildTimeout):
            child.call("sleep", 30, timeout=0.5)
        assert time.monotonic() - start < 2
        stopped = h.spawn(echoes)
        stopped.call("echo", 0, timeout=30)
        stopped.signal(signal.SIGSTOP)  # even a stopped child goes
        silent = h.spawn(exits_silently)
        with pytest.raises(ChildDied):
            silent.recv(timeout=30)
        assert silent.join(5) == 7
        pids = [child.pid, stopped.pid]
    assert not any(alive(pid) for pid in pids), "a child outlived its harness"
