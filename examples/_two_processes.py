"""What the two-process examples share, none of it their subject: two roles in two spawned
processes joined by a pipe, a free port for a listener, linking to a peer on 127.0.0.1, and the
one-line verdict. Each example keeps its own `LLMConfig` and its own transfers."""
import multiprocessing
import sys

from llm_datadist_torch import LLMClusterInfo, LLMStatusCode
from llm_datadist_torch.control.host import free_port

__all__ = ["cluster_info", "free_port", "link", "report", "run_pair"]


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


def cluster_info(remote_cluster_id, remote_port=None):
    """The peer `remote_cluster_id`, listening on 127.0.0.1:`remote_port`; without a port, just
    its id (enough for `unlink_clusters(..., force=True)`)."""
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = remote_cluster_id
    if remote_port is not None:
        cluster.append_local_ip_info("127.0.0.1", 0)
        cluster.append_remote_ip_info("127.0.0.1", remote_port)
    return cluster


def link(datadist, remote_cluster_id, remote_port, timeout_ms=5000):
    """`link_clusters` to the peer listening on 127.0.0.1:`remote_port`; raises unless it
    succeeded. Returns the peer's `LLMClusterInfo`, for `unlink_clusters`."""
    cluster = cluster_info(remote_cluster_id, remote_port)
    ret, _ = datadist.link_clusters([cluster], timeout_ms)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise RuntimeError(f"link_clusters failed: {ret}")
    return cluster


def report(summary: str, ok: bool) -> None:
    """Print the example's one line and exit: 0 if every byte matched, 1 otherwise."""
    print(f"{summary}, {'all bytes match' if ok else 'MISMATCH'}")
    sys.exit(0 if ok else 1)
