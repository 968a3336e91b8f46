"""The host bounce buffer (local memory a transport cannot reach): segment splitting, chunking
and both directions, byte-exact, through the real `local` transport and a deliberately small
buffer so that one transfer needs many chunks and segments larger than the buffer."""
import time

import pytest
import torch

from llm_datadist_torch._bounce import BounceBuffer, _chunks, split_segments
from llm_datadist_torch.transport.base import MemoryRegion, Peer, TransferItem
from llm_datadist_torch.transport.local import LocalTransport

PEER = Peer(pid=0, same_process=True, same_host=True)


def item(remote: torch.Tensor, local: torch.Tensor, remote_offsets, local_offsets, lengths):
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    region = MemoryRegion(address=remote.data_ptr(), nbytes=remote.numel())
    return TransferItem(region, as_tensor(remote_offsets), local, as_tensor(local_offsets),
                        as_tensor(lengths))


def segments_of(transfer_item):
    return list(zip(transfer_item.remote_offsets.tolist(), transfer_item.local_offsets.tolist(),
                    transfer_item.lengths.tolist()))


def test_split_segments_keeps_every_byte_in_place():
    buffer = torch.zeros(1, dtype=torch.uint8)
    original = item(buffer, buffer, [0, 1000, 50], [7, 0, 3000], [250, 10, 101])
    pieces = segments_of(split_segments(original, 100))
    assert pieces == [(0, 7, 100), (100, 107, 100), (200, 207, 50), (1000, 0, 10),
                      (50, 3000, 100), (150, 3100, 1)]
    assert split_segments(original, 250) is original  # nothing to split


def test_chunks_fill_the_buffer_and_never_exceed_it():
    buffer = torch.zeros(1, dtype=torch.uint8)
    items = [item(buffer, buffer, [0, 40, 90], [0, 40, 90], [30, 50, 70]),
             item(buffer, buffer, [5], [5], [130])]
    chunks = list(_chunks(items, 64))
    for chunk in chunks:
        used = [(int(packed[i]), int(it.lengths[part][i])) for it, part, packed in chunk
                for i in range(part.stop - part.start)]
        ends = [start + length for start, length in used]
        assert max(ends) <= 64
        assert sorted(used) == used and all(a[0] + a[1] <= b[0] for a, b in zip(used, used[1:]))
    total = sum(int(it.lengths[part].sum()) for chunk in chunks for it, part, _ in chunk)
    assert total == 30 + 50 + 70 + 130


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
