"""Memory arenas: one pre-faulted block of cache memory per pool (spec §26.3).

On CPU an arena is a /dev/shm file mapped MAP_SHARED|MAP_POPULATE, so that a peer process on
the same host can map the same pages later, and so that first-touch page faults are paid once
at creation instead of during transfers. Files are mode 0600, removed at `close()`, and files
left behind by a crashed process are swept when the next arena is created.
On an accelerator the arena is one device tensor; a host arena there is pinned memory.
"""
from __future__ import annotations

import itertools
import logging
import mmap
import os
import secrets
from typing import Optional

import torch

from ..status import LLMStatusCode, fail

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SHM_PREFIX = "llm_datadist_torch"
_counter = itertools.count()


def _pid_namespace() -> str:
    """The inode of this process's pid namespace: pids mean something only inside it."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


PID_NAMESPACE = _pid_namespace()


def shm_file_name(tag: str) -> str:
    """An unguessable /dev/shm file name that says which process (pid, pid namespace) owns it."""
    return (f"{SHM_PREFIX}.{os.getpid()}.{PID_NAMESPACE}.{tag}.{next(_counter)}."
            f"{secrets.token_hex(8)}")


def pid_alive(pid: int) -> bool:
    """Whether `pid` names a process of this pid namespace (a zombie still does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_shm_files() -> int:
    """Remove files of this library whose owning process is gone; returns how many were removed.

    Only files of processes in this pid namespace are looked at: another container sharing
    /dev/shm has pids that mean nothing here."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        parts = name.split(".")
        if len(parts) < 4 or parts[0] != SHM_PREFIX or not parts[1].isdigit() \
                or parts[2] != PID_NAMESPACE:
            continue
        if pid_alive(int(parts[1])):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed += 1
        except OSError:
            pass
    if removed:
        logger.info("removed %d shared-memory file(s) left by dead processes", removed)
    return removed


def owned_shm_files(pid: Optional[int] = None) -> list:
    """Arena file names owned by `pid` (default: this process)."""
    marker = f"{SHM_PREFIX}.{os.getpid() if pid is None else pid}.{PID_NAMESPACE}."
    try:
        return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(marker))
    except OSError:
        return []


class MemoryArena:
    """A block of `nbytes` bytes exposed as a 1-D uint8 tensor."""

    def __init__(self, tensor: torch.Tensor, shm_path: Optional[str] = None, mapping=None):
        self.tensor = tensor
        self.shm_path = shm_path
        self._mapping = mapping

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def slice(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset:offset + nbytes]

    @classmethod
    def create(cls, device: torch.device, nbytes: int, tag: str, pinned: bool = False) -> "MemoryArena":
        """A new arena; `LLMException(LLM_OUT_OF_MEMORY)` if the memory cannot be had."""
        if device.type == "cpu" and not pinned:
            return cls._create_shm(nbytes, tag)
        try:
            if device.type == "cpu":
                tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            else:
                tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            fail(LLMStatusCode.LLM_OUT_OF_MEMORY, "cannot allocate %d bytes on %s: %s", nbytes, device, exc)
        return cls(tensor)

    @classmethod
    def _create_shm(cls, nbytes: int, tag: str) -> "MemoryArena":
        sweep_stale_shm_files()
        name = shm_file_name(tag)
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # fallocate reserves tmpfs pages now: a full /dev/shm fails here with ENOSPC
            # instead of killing the process with SIGBUS on first touch later.
            os.posix_fallocate(fd, 0, nbytes)
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.unlink(path)
            fail(LLMStatusCode.LLM_OUT_OF_MEMORY, "cannot create %d byte shared-memory arena: %s",
                 nbytes, exc)
        finally:
            os.close(fd)
        return cls(torch.frombuffer(mapping, dtype=torch.uint8), shm_path=path, mapping=mapping)

    def close(self) -> None:
        """Release the arena. Views handed out earlier keep their pages alive until dropped."""
        if self.shm_path is not None:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass
            self.shm_path = None
        self.tensor = None
        # Do not mmap.close() here: torch.frombuffer keeps a reference to the mapping but no
        # buffer export, so close() would succeed and unmap pages that views handed out earlier
        # still point at (segfault on their next use). Dropping our reference lets the mapping
        # be unmapped when the last tensor over it is gone.
        self._mapping = None
