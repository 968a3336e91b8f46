"""A small harness for multi-process tests: spawned children, deadlines, piped tracebacks.

    with Harness() as h:
        child = h.spawn(target, arg1, arg2)   # target(conn, arg1, arg2) runs in a spawned child
        ready = child.recv(timeout=10)        # whatever the child sent, or ChildError / timeout
        child.send(("go",))
        assert child.join(timeout=10) == 0

* Children are started with the ``spawn`` context (no inherited locks, threads or zmq state).
* Every wait has a deadline; a child that does not answer in time fails the test with
  `ChildTimeout`, a child that dies without answering with `ChildDied`.
* An exception escaping ``target`` in the child is sent back with its traceback text and
  re-raised in the parent as `ChildError` (its message contains the child's traceback).
* `serve(conn, handlers)` turns a child into a small RPC server: `Child.call(name, ...)`
  runs ``handlers[name](...)`` there and returns the result; an exception raised by the
  handler comes back as `ChildError` with ``exc_type``, ``status_code`` (for LLMException)
  and the traceback, and the child keeps serving.
* A child whose target returns exits with code 0 after running its exit handlers (see
  `_quick_exit`); one whose target raises exits with code 1.
* On leaving the context (normally or by an exception) every child still running is
  terminated, then killed; a child also exits by itself when its parent disappears.
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

DEFAULT_TIMEOUT_S = 30.0
_ERROR = "__harness_child_error__"
_RESULT = "__harness_result__"
_RAISED = "__harness_raised__"
_CALL = "__harness_call__"
_STOP = "__harness_stop__"
_ENV_LOCK = threading.Lock()


class ChildError(AssertionError):
    """An exception in a child, with the child's traceback text in the message."""

    def __init__(self, name: str, exc_type: str, message: str, child_traceback: str,
                 status_code: Optional[int] = None):
        super().__init__(f"{name}: {exc_type}: {message}\n--- traceback in {name} ---\n"
                         f"{child_traceback}")
        self.child = name
        self.exc_type = exc_type
        self.message = message
        self.child_traceback = child_traceback
        self.status_code = status_code


class ChildTimeout(AssertionError):
    """A child did not answer (or exit) within the deadline."""


class ChildDied(AssertionError):
    """A child exited without sending what the parent waited for."""


def _describe_exception(exc: BaseException):
    code = getattr(exc, "status_code", None)
    try:
        code = None if code is None else int(code)
    except (TypeError, ValueError):
        code = None
    return type(exc).__name__, str(exc), traceback.format_exc(), code


def _watch_parent(parent_pid: int) -> None:
    """Exit this child when the parent is gone (e.g. the test runner was killed)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(3)


def _quick_exit(code: int) -> None:
    """Exit the way the interpreter would (threads joined, atexit handlers run, so the library's
    own exit-time cleanup is exercised) but without the ~1 s of module teardown that a spawned
    child with torch loaded otherwise spends in `sys.exit`."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # joins non-daemon threads
    except Exception:  # noqa: BLE001
        pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _child_main(conn, target: Callable, args: tuple, env: Dict[str, str], parent_pid: int,
                quick_exit: bool) -> None:
    os.environ.update(env)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        target(conn, *args)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        exc_type, message, text, code = _describe_exception(exc)
        try:
            conn.send((_ERROR, exc_type, message, text, code))
        except (OSError, ValueError):
            pass
        conn.close()
        os._exit(1)
    conn.close()
    if quick_exit:
        _quick_exit(0)


def serve(conn, handlers: Dict[str, Callable[..., Any]]) -> None:
    """Run `handlers[name](*args, **kwargs)` for every `Child.call` until `Child.stop_serving`.

    Returns when the parent asks, or when the pipe closes.
    """
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == _STOP:
            conn.send((_RESULT, None))
            return
        _, name, args, kwargs = message
        try:
            result = handlers[name](*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the parent, the child goes on
            conn.send((_RAISED,) + _describe_exception(exc))
            continue
        conn.send((_RESULT, result))


class Child:
    """The parent's handle on one spawned child."""

    def __init__(self, process, conn, name: str):
        self.process = process
        self.conn = conn
        self.name = name

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, obj) -> None:
        self.conn.send(obj)

    def recv(self, timeout: float = DEFAULT_TIMEOUT_S):
        """The next object the child sent; re-raises the child's exception as `ChildError`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                ready = self.conn.poll(min(max(remaining, 0), 0.1))
            except (EOFError, OSError):
                ready = True  # closed: recv below says why
            if ready:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    self.process.join(1)
                    raise ChildDied(f"{self.name} (pid {self.pid}) closed its pipe; exit code "
                                    f"{self.process.exitcode}") from None
                if isinstance(message, tuple) and message and message[0] == _ERROR:
                    _, exc_type, text, tb, code = message
                    self.process.join(5)
                    raise ChildError(self.name, exc_type, text, tb, code)
                return message
            if not self.process.is_alive() and not self.conn.poll(0):
                raise ChildDied(f"{self.name} (pid {self.pid}) exited with code "
                                f"{self.process.exitcode} without answering")
            if remaining <= 0:
                raise ChildTimeout(f"{self.name} (pid {self.pid}) sent nothing within {timeout} s")

    def call(self, name: str, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs):
        """Run handler `name` in a child that is in `serve()`; its return value, or ChildError."""
        self.begin(name, *args, **kwargs)
        return self.end(timeout)

    def begin(self, name: str, *args, **kwargs) -> None:
        """Start handler `name` without waiting (to run calls in several children at once);
        `end()` collects its result."""
        self.send((_CALL, name, args, kwargs))

    def end(self, timeout: float = DEFAULT_TIMEOUT_S):
        """The result of the call `begin` started (or its ChildError)."""
        reply = self.recv(timeout)
        if reply[0] == _RAISED:
            _, exc_type, text, tb, code = reply
            raise ChildError(self.name, exc_type, text, tb, code)
        assert reply[0] == _RESULT, f"{self.name}: unexpected message {reply!r}"
        return reply[1]

    def stop_serving(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.send((_STOP,))
        self.recv(timeout)

    def join(self, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Wait for the child to exit; its exit code (a child error is re-raised)."""
        self.process.join(timeout)
        if self.process.is_alive():
            raise ChildTimeout(f"{self.name} (pid {self.pid}) did not exit within {timeout} s")
        with contextlib.suppress(EOFError, OSError):
            while self.conn.poll(0):
                message = self.conn.recv()
                if isinstance(message, tuple) and message and message[0] == _ERROR:
                    _, exc_type, text, tb, code = message
                    raise ChildError(self.name, exc_type, text, tb, code)
        return self.process.exitcode

    def finish(self, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Leave `serve()` and wait for a clean exit; asserts exit code 0."""
        self.stop_serving(timeout)
        code = self.join(timeout)
        assert code == 0, f"{self.name} (pid {self.pid}) exited with {code}"
        return code

    def signal(self, signum: int) -> None:
        if self.process.is_alive():
            os.kill(self.pid, signum)

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL and reap."""
        if self.process.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self.process.join(timeout)

    def stop(self, grace_s: float = 2.0) -> None:
        """Terminate (SIGTERM, or SIGKILL for a stopped child), wait, then kill; always reaps."""
        if self.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)  # a SIGSTOPped child cannot act on SIGTERM
            self.process.terminate()
            self.process.join(grace_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(grace_s)
        with contextlib.suppress(OSError):
            self.conn.close()


class Harness:
    """Spawns children and guarantees that none outlives the `with` block."""

    def __init__(self, env: Optional[Dict[str, str]] = None, quick_exit: bool = True):
        self._ctx = multiprocessing.get_context("spawn")
        self._quick_exit = quick_exit
        self._env = {"LLM_DATADIST_TORCH_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
        self._env.update(env or {})
        self.children: List[Child] = []

    def spawn(self, target: Callable, *args, name: Optional[str] = None,
              env: Optional[Dict[str, str]] = None) -> Child:
        """Start `target(conn, *args)` in a new process; `target` must be importable."""
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        child_env = dict(self._env)
        child_env.update(env or {})
        name = name or f"{getattr(target, '__name__', 'child')}#{len(self.children)}"
        process = self._ctx.Process(target=_child_main, name=name, daemon=True,
                                    args=(child_conn, target, args, child_env, os.getpid(),
                                          self._quick_exit))
        # The environment must be in place before the child imports anything (torch reads
        # OMP_NUM_THREADS at import), so the child inherits it at exec time.
        with _ENV_LOCK:
            saved = {key: os.environ.get(key) for key in child_env}
            os.environ.update(child_env)
            try:
                process.start()
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        child_conn.close()
        child = Child(process, parent_conn, name)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            child.stop()

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
