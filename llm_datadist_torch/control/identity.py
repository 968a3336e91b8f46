"""Who the peer of a handshake really is, decided from local facts and proofs, never from its word.

* Same process: the client registers the fresh challenge of its `Hello` here; a server in this
  process that receives it sees it registered, and the client sees that a server of this
  process answered it. A remote peer can repeat a challenge, never make it appear here.
* Same host (shm and cma): the prover creates a file in /dev/shm holding the verifier's fresh
  challenge and keeps it open; the verifier reads the file from its own /dev/shm (so both see
  one /dev/shm: same kernel, IPC and mount namespaces) and finds it open in
  `/proc/<claimed pid>/fd/<fd>` (so the claimed pid, in the verifier's pid namespace, is the
  prover). A peer that cannot prove it is treated as being on another host.
"""
from __future__ import annotations

import os
import secrets
import stat
import threading
from typing import Optional, Set, Tuple

from ..memory.arena import SHM_DIR, shm_file_name

CHALLENGE_BYTES = 16
# A proof holds its direction before the challenge: a server's proof (in `HelloReply`) can never
# pass as a client's (`Proof`), so nobody gets one side to prove a challenge meant for the other.
SERVER_PROOF = b"llmdd-server-proof:"
CLIENT_PROOF = b"llmdd-client-proof:"

_lock = threading.Lock()
_local_challenges: Set[bytes] = set()  # challenges of Hellos sent from this process
_answered: Set[bytes] = set()  # ... that a server of this process answered


def new_challenge() -> bytes:
    """A fresh challenge for a `Hello` sent from this process (forget it with `forget`)."""
    challenge = secrets.token_bytes(CHALLENGE_BYTES)
    with _lock:
        _local_challenges.add(challenge)
    return challenge


def answer_if_local(challenge: bytes) -> bool:
    """(Server side.) Whether `challenge` was issued in this process; marks it answered."""
    with _lock:
        if challenge in _local_challenges:
            _answered.add(challenge)
            return True
    return False


def answered_locally(challenge: bytes) -> bool:
    """(Client side.) Whether a server of this process answered our `challenge`."""
    with _lock:
        return challenge in _answered


def forget(challenge: bytes) -> None:
    with _lock:
        _local_challenges.discard(challenge)
        _answered.discard(challenge)


class ProofFile:
    """A /dev/shm file holding a peer's challenge after the prover's direction (`SERVER_PROOF`
    or `CLIENT_PROOF`), kept open until `close` (prover side)."""

    def __init__(self, direction: bytes, challenge: bytes):
        self.name = shm_file_name("proof")
        self.fd = os.open(os.path.join(SHM_DIR, self.name),
                          os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(self.fd, direction + challenge)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1


def verify_proof(direction: bytes, challenge: bytes, pid: int, name: str,
                 fd: int) -> Tuple[bool, str]:
    """(Verifier side.) Whether process `pid` holds `/dev/shm/<name>` open as `fd` and the file
    holds `challenge` proven in `direction`; with the reason when it does not."""
    if not name or "/" in name or name in (".", "..") or fd < 0 or pid <= 0:
        return False, "no proof offered"
    if pid == os.getpid():
        # A peer in this process is proven by the challenge registry, never by a file: the only
        # files here holding a peer's bytes are our own proofs for other peers, written with
        # challenges they chose (a peer could make us "prove" its claim to be us).
        return False, f"pid {pid} is this process"
    path = os.path.join(SHM_DIR, name)
    try:
        held = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError as exc:
        return False, f"/proc/{pid}/fd/{fd}: {exc.strerror}"
    if held != path:
        return False, f"pid {pid} does not hold {path}"
    try:
        # Never block: the file the peer names may be a FIFO (or be swapped for one).
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC),
                  "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return False, f"{path} is not a regular file"
            content = f.read(len(direction) + CHALLENGE_BYTES + 1)
    except OSError as exc:
        return False, f"{path}: {exc.strerror}"
    if not secrets.compare_digest(content, direction + challenge):
        return False, f"{path} does not hold our challenge"
    return True, ""


def start_time(pid: int) -> Optional[int]:
    """The start time of `pid` (clock ticks since boot), or None if it is gone: a pid whose
    start time changed is another process (pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields 3 (state) and 22; the command name (field 2) may hold spaces and parentheses:
    # split after it. A zombie (killed, not yet reaped) is gone too.
    fields = stat.rsplit(b")", 1)[1].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])
