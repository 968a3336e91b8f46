"""The host bounce buffer (local memory a transport cannot reach): both directions, byte-exact,
through the real `local` transport and a deliberately small buffer so that one transfer needs
many chunks and segments larger than the buffer."""
import time

import pytest
import torch

from llm_datadist_torch.core.descriptors import Region
from llm_datadist_torch.transport.bounce import BounceBuffer
from llm_datadist_torch.transport.base import Peer, TransferItem
from llm_datadist_torch.transport.local import LocalTransport

PEER = Peer(pid=0, same_process=True, same_host=True)


def item(remote: torch.Tensor, local: torch.Tensor, remote_offsets, local_offsets, lengths):
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    region = Region(address=remote.data_ptr(), nbytes=remote.numel())
    return TransferItem(region, as_tensor(remote_offsets), local, as_tensor(local_offsets),
                        as_tensor(lengths))


@pytest.mark.parametrize("pulling", [True, False], ids=["read", "write"])
def test_move_through_a_small_buffer(datadist, pulling):
    engine = datadist.cache_manager._engine
    bounce = BounceBuffer(engine, nbytes=4096)
    generator = torch.Generator().manual_seed(1)
    remote = torch.randint(0, 256, (128 << 10,), dtype=torch.uint8, generator=generator)
    local = torch.randint(0, 256, (128 << 10,), dtype=torch.uint8, generator=generator)
    want_remote, want_local = remote.clone(), local.clone()
    # 19 scattered 1 KiB blocks, then one segment larger than the buffer.
    remote_offsets = (torch.randperm(60, generator=generator)[:19] * 1024).tolist() + [64 << 10]
    local_offsets = list(reversed(remote_offsets[:19])) + [70 << 10]
    lengths = [1024] * 19 + [9000]
    transfers = [item(remote, local, remote_offsets, local_offsets, lengths)]
    transport = LocalTransport(PEER)
    try:
        moved = bounce.move(transport, transfers, pulling, time.monotonic() + 10)
    finally:
        transport.close()
        bounce.close()
    assert moved == sum(lengths)
    for r, l, n in zip(remote_offsets, local_offsets, lengths):
        if pulling:
            want_local[l:l + n] = want_remote[r:r + n]
        else:
            want_remote[r:r + n] = want_local[l:l + n]
    assert torch.equal(local, want_local) and torch.equal(remote, want_remote)
