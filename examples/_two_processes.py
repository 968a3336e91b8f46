"""Run two example roles in two spawned processes joined by a pipe; exit 0 only if both did."""
import multiprocessing
import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a listen_ip_info)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_pair(first, second, *args, timeout_s: float = 60) -> None:
    """Start `first(conn, *args)` and `second(conn, *args)`, wait, and exit with their verdict."""
    ctx = multiprocessing.get_context("spawn")
    first_conn, second_conn = ctx.Pipe()
    processes = [ctx.Process(target=first, args=(first_conn, *args)),
                 ctx.Process(target=second, args=(second_conn, *args))]
    for process in processes:
        process.start()
    first_conn.close()  # the children hold the pipe now: if one dies, the other sees EOF
    second_conn.close()
    for process in processes:
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join()
    sys.exit(0 if all(p.exitcode == 0 for p in processes) else 1)
