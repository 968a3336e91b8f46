"""The one bounds check of every copy (csrc/segments.cpp), on real memory: hostile ranges go
straight into every native entry point and through every Python copy path, and are refused
before a byte moves; valid edge cases copy byte-exact.

CMA runs against this very process (process_vm_readv/writev on our own pid are real syscalls),
so no child is needed; tests/transport covers CMA and shm with a real peer process.
"""
import os

import pytest
import torch

from llm_datadist_torch import _C
from llm_datadist_torch.core.descriptors import Region
from llm_datadist_torch.memory.copy import SegmentBatch, copy_batches, region_table
from llm_datadist_torch.status import LLMException, LLMStatusCode
from llm_datadist_torch.transport.base import Peer, TransferItem, check_items
from llm_datadist_torch.transport.cma import CmaTransport
from llm_datadist_torch.transport.local import LocalTransport

SIZE = 256
I64_MAX = 2**63 - 1
PARAM = LLMStatusCode.LLM_PARAM_INVALID


def i64(values):
    return torch.tensor(values, dtype=torch.int64)


def table(*tensors):
    return i64([[t.data_ptr(), t.nbytes] for t in tensors]).view(-1, 2)


def as_i64(value):
    """The int64 bit pattern of a value in [-2**63, 2**64)."""
    return value - 2**64 if value >= 2**63 else value


# (offset, length) of one segment against a region of SIZE bytes; every one is out of range.
HOSTILE = {
    "offset_near_2^63": (I64_MAX, 2),                   # offset + length wraps to negative
    "offset_2^63": (as_i64(2**63), 16),                 # the int64 pattern of 2**63
    "offset_2^64-1": (as_i64(2**64 - 1), 1),            # -1: offset + length wraps to 0
    "offset_2^64-16": (as_i64(2**64 - 16), 32),         # wraps to 16, inside the region
    "length_wraps": (16, I64_MAX),                      # 16 + (2**63 - 1) wraps
    "both_2^62": (2**62, 2**62),                        # sums to 2**63: wraps int64
    "length_2^64-offset": (200, as_i64(2**64 - 200)),   # as uint64, offset + length == 2**64
    "negative_offset": (-16, 16),
    "negative_length": (0, -1),
    "one_past_end": (SIZE - 15, 16),
    "offset_past_end": (SIZE + 1, 0),                   # even with no bytes to move
}


def segments_with_bad(where, bad):
    """Two segments, the second one hostile on `where` ("a", "b" or "length")."""
    offset, length = bad
    a_off, b_off, lengths = [0, 0], [SIZE // 2, SIZE // 2], [8, 8]
    if where == "a":
        a_off[1], lengths[1] = offset, length
    elif where == "b":
        b_off[1], lengths[1] = offset, length
    else:
        lengths[1] = length
    return a_off, b_off, lengths


def expected_side(where, bad, names):
    """The side named: side a is checked first, so a length too long for any region of SIZE
    bytes is reported there, whichever side carries the hostile offset."""
    if bad[1] < 0:
        return "length"
    return names[0] if where == "a" or bad[1] > SIZE else names[1]


# ---------------------------------------------------------------- the native entry points


def copy_call(a, b, a_off, b_off, lengths, a_index=None, b_index=None, **tables):
    n = len(lengths)
    return _C.copy_segments(tables.get("a_table", table(a)), i64(a_index or [0] * n), i64(a_off),
                            tables.get("b_table", table(b)), i64(b_index or [0] * n), i64(b_off),
                            i64(lengths), 2)


def check_call(a, b, a_off, b_off, lengths, a_index=None, b_index=None, **tables):
    n = len(lengths)
    return _C.check_segments(tables.get("a_table", table(a)), i64(a_index or [0] * n),
                             i64(a_off), tables.get("b_table", table(b)),
                             i64(b_index or [0] * n), i64(b_off), i64(lengths))


def resolve_call(a, b, a_off, b_off, lengths, a_index=None, b_index=None, **tables):
    n = len(lengths)
    return _C.resolve_segments(tables.get("a_table", table(a)), i64(a_index or [0] * n),
                               i64(a_off), tables.get("b_table", table(b)),
                               i64(b_index or [0] * n), i64(b_off), i64(lengths))


def cma_call(fn):
    def call(a, b, a_off, b_off, lengths, a_index=None, b_index=None, **tables):
        n = len(lengths)
        return fn(os.getpid(), tables.get("a_table", table(a)), i64(a_index or [0] * n),
                  i64(a_off), tables.get("b_table", table(b)), i64(b_index or [0] * n),
                  i64(b_off), i64(lengths), 2)
    return call


# name -> (call, side names, which tensor is written: "a" or "b")
ENTRY_POINTS = {
    "copy_segments": (copy_call, ("source", "destination"), "b"),
    "check_segments": (check_call, ("source", "destination"), None),
    "resolve_segments": (resolve_call, ("local", "remote"), None),
    "cma_read": (cma_call(_C.cma_read), ("local", "remote"), "a"),
    "cma_write": (cma_call(_C.cma_write), ("local", "remote"), "b"),
}


@pytest.fixture
def buffers():
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (SIZE,), dtype=torch.uint8, generator=gen)
    b = torch.randint(0, 256, (SIZE,), dtype=torch.uint8, generator=gen)
    return a, b


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("where", ["a", "b"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_range_is_refused_before_any_byte_moves(buffers, entry, where, case):
    call, names, _ = ENTRY_POINTS[entry]
    a, b = buffers
    before = a.clone(), b.clone()
    a_off, b_off, lengths = segments_with_bad(where, HOSTILE[case])
    with pytest.raises(_C.SegmentRangeError) as info:
        call(a, b, a_off, b_off, lengths)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.segment == 1  # the valid first segment is not what is named
    assert err.side == expected_side(where, HOSTILE[case], names)
    assert err.side in str(err) and "segment 1" in str(err)
    if err.side != "length":
        assert err.region == 0
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])  # not even segment 0 moved


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("index", [1, -1, I64_MAX, as_i64(2**63)])
def test_region_index_out_of_range_is_refused(buffers, entry, index):
    call, names, _ = ENTRY_POINTS[entry]
    a, b = buffers
    before = a.clone(), b.clone()
    for side, kwargs in ((names[0], {"a_index": [0, index]}), (names[1], {"b_index": [0, index]})):
        with pytest.raises(_C.SegmentRangeError, match="region index") as info:
            call(a, b, [0, 0], [0, 8], [8, 8], **kwargs)
        assert (info.value.side, info.value.segment, info.value.region) == (side, 1, -1)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_malformed_region_is_refused(buffers, entry):
    """A negative size, or an end past 2**64, is refused even if no segment uses the row."""
    call, names, _ = ENTRY_POINTS[entry]
    a, b = buffers
    before = a.clone(), b.clone()
    for row, text in (([a.data_ptr(), -1], "negative size"),
                      ([as_i64(2**64 - 16), 32], "past the end of the address space"),
                      ([as_i64(2**64 - 1), 1], "past the end of the address space")):
        bad_table = i64([[a.data_ptr(), a.nbytes], row])
        with pytest.raises(_C.SegmentRangeError, match=text) as info:
            call(a, b, [0], [0], [8], a_table=bad_table)
        assert (info.value.side, info.value.segment, info.value.region) == (names[0], -1, 1)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_zero_size_region(buffers, entry):
    """A zero-byte region (at an address nothing maps) takes zero-length segments at offset 0
    only."""
    call, _, _ = ENTRY_POINTS[entry]
    a, b = buffers
    before = a.clone(), b.clone()
    empty = i64([[0x10, 0]])
    assert call(a, b, [0], [0], [0], a_table=empty) is not None
    for offset, length in ((0, 1), (1, 0), (-1, 0)):
        with pytest.raises(_C.SegmentRangeError):
            call(a, b, [offset], [0], [length], a_table=empty)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_total_length_overflow_is_refused(buffers):
    """Lengths that each fit their (claimed, huge) region but add up past 2**63 - 1."""
    a, b = buffers
    huge = i64([[0x1000, 2**62 + 1]])
    for entry in sorted(ENTRY_POINTS):
        call, _, _ = ENTRY_POINTS[entry]
        with pytest.raises(_C.SegmentRangeError, match="add up") as info:
            call(a, b, [0, 0], [0, 0], [2**62, 2**62], a_table=huge, b_table=huge)
        assert (info.value.side, info.value.segment) == ("length", 1)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_valid_edges_are_byte_exact(buffers, entry):
    """Segments ending exactly at the region end, and zero-length ones at offset == size."""
    call, _, written = ENTRY_POINTS[entry]
    a, b = buffers
    before = a.clone(), b.clone()
    a_off, b_off, lengths = [SIZE - 40, 0, SIZE, 0], [0, SIZE - 24, SIZE, 7], [40, 24, 0, 0]
    result = call(a, b, a_off, b_off, lengths)
    if entry == "resolve_segments":
        assert result[0].tolist() == [a.data_ptr() + o for o in a_off]
        assert result[1].tolist() == [b.data_ptr() + o for o in b_off]
    else:
        assert result == 64
    expected = [before[0].clone(), before[1].clone()]
    if written == "b":
        expected[1][0:40] = before[0][SIZE - 40:]
        expected[1][SIZE - 24:] = before[0][:24]
    elif written == "a":  # cma_read: remote (b) -> local (a)
        expected[0][SIZE - 40:] = before[1][0:40]
        expected[0][:24] = before[1][SIZE - 24:]
    assert torch.equal(a, expected[0]) and torch.equal(b, expected[1])


# ---------------------------------------------------------------- Python copy paths


def assert_param_invalid(excinfo, *texts):
    assert excinfo.value.status_code == PARAM, excinfo.value
    for text in texts:
        assert text in str(excinfo.value), str(excinfo.value)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: the torch (device) copy path
@pytest.mark.parametrize("where", ["src", "dst"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_copy_batches_refuses(device, where, case):
    src = torch.arange(SIZE, dtype=torch.uint8).to(device)
    dst = torch.zeros(SIZE, dtype=torch.uint8).to(device)
    offset, length = HOSTILE[case]
    s_off, d_off, lengths = [0, 0], [8, 8], [8, 8]
    if where == "src":
        s_off[1], lengths[1] = offset, length
    else:
        d_off[1], lengths[1] = offset, length
    good = SegmentBatch(src, dst, i64([0]), i64([100]), i64([4]))
    bad = SegmentBatch(src, dst, i64(s_off), i64(d_off), i64(lengths))
    with pytest.raises(LLMException) as excinfo:
        copy_batches([good, bad])
    assert_param_invalid(excinfo, "batch 1's segment 1")
    if device == "cpu":
        assert dst.eq(0).all()


def test_copy_batches_names_the_caller_batch_and_context():
    src, dst = torch.ones(SIZE, dtype=torch.uint8), torch.zeros(SIZE, dtype=torch.uint8)
    empty = SegmentBatch(src, dst, i64([]), i64([]), i64([]))
    bad = SegmentBatch(src, dst, i64([0, 0, 0]), i64([0, 8, SIZE - 4]), i64([8, 8, 8]))
    with pytest.raises(LLMException) as excinfo:
        copy_batches([empty, bad], ordered=True, where=lambda i: "layer %d" % i)
    assert_param_invalid(excinfo, "destination segment 2", "batch 1's segment 2; layer 1")
    assert dst.eq(0).all()


def test_copy_batches_valid_edges_byte_exact():
    src = torch.arange(SIZE, dtype=torch.uint8)
    dst = torch.zeros(SIZE, dtype=torch.uint8)
    moved = copy_batches([SegmentBatch(src, dst, i64([SIZE - 16, SIZE, 0]),
                                       i64([SIZE - 16, 3, SIZE]), i64([16, 0, 0]))])
    assert moved == 16
    assert torch.equal(dst[SIZE - 16:], src[SIZE - 16:]) and dst[:SIZE - 16].eq(0).all()


def test_copy_batches_rejects_non_byte_tensors():
    words = torch.zeros(SIZE // 4, dtype=torch.int32)
    with pytest.raises(LLMException) as excinfo:
        copy_batches([SegmentBatch(words, words, i64([0]), i64([4]), i64([4]))])
    assert_param_invalid(excinfo, "uint8")


def test_region_table_keeps_high_addresses_and_refuses_beyond_64_bits():
    assert region_table([(2**64 - 16, 16)]).tolist() == [[-16, 16]]
    assert region_table([]).shape == (0, 2)
    with pytest.raises(LLMException) as excinfo:
        region_table([(2**64, 1)])
    assert_param_invalid(excinfo, "64 bits")


# ---------------------------------------------------------------- transports


class Memory:
    """A 'remote' region (this process's memory, reached by address) and a local tensor."""

    def __init__(self):
        gen = torch.Generator().manual_seed(7)
        self.remote = torch.randint(0, 256, (SIZE,), dtype=torch.uint8, generator=gen)
        self.local = torch.randint(0, 256, (SIZE,), dtype=torch.uint8, generator=gen)
        self.region = Region(self.remote.data_ptr(), SIZE)
        self.before = self.remote.clone(), self.local.clone()

    def item(self, remote_offsets, local_offsets, lengths, region=None):
        return TransferItem(region or self.region, i64(remote_offsets), self.local,
                            i64(local_offsets), i64(lengths))

    def untouched(self):
        return torch.equal(self.remote, self.before[0]) and torch.equal(self.local, self.before[1])


TRANSPORTS = {
    "local": lambda: LocalTransport(Peer(os.getpid(), same_process=True, same_host=True)),
    # CMA to our own pid: real process_vm_readv/writev
    "cma": lambda: CmaTransport(Peer(os.getpid(), same_process=False, same_host=True)),
}


@pytest.mark.parametrize("name", sorted(TRANSPORTS))
@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("where", ["remote", "local"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_transport_refuses(name, direction, where, case):
    memory = Memory()
    transport = TRANSPORTS[name]()
    offset, length = HOSTILE[case]
    r_off, l_off, lengths = [0, 0], [0, 64], [8, 8]
    if where == "remote":
        r_off[1], lengths[1] = offset, length
    else:
        l_off[1], lengths[1] = offset, length
    items = [memory.item([0], [128], [16]), memory.item(r_off, l_off, lengths)]
    try:
        with pytest.raises(LLMException) as excinfo:
            getattr(transport, direction)(items, 10.0)
    finally:
        transport.close()
    # A length too long for any region is reported on whichever side is checked first.
    side = "length" if length < 0 else "segment" if length > SIZE else where
    assert_param_invalid(excinfo, side, "item 1's segment 1", "peer pid %d" % os.getpid())
    assert memory.untouched()


@pytest.mark.parametrize("name", sorted(TRANSPORTS))
def test_transport_refuses_bad_regions(name):
    memory = Memory()
    transport = TRANSPORTS[name]()
    bad_regions = [Region(memory.remote.data_ptr(), -1), Region(2**64 - 16, 32),
                   Region(2**64, 16), Region(0x10, 0)]
    try:
        for region in bad_regions:
            with pytest.raises(LLMException) as excinfo:
                transport.read([memory.item([0], [0], [8], region=region)], 10.0)
            assert_param_invalid(excinfo, "peer pid %d" % os.getpid())
    finally:
        transport.close()
    assert memory.untouched()


@pytest.mark.parametrize("name", sorted(TRANSPORTS))
def test_transport_nothing_to_move_still_checks(name):
    """A transfer of zero bytes in all is refused all the same when a range is bad."""
    memory = Memory()
    transport = TRANSPORTS[name]()
    try:
        assert transport.read([memory.item([SIZE], [SIZE], [0])], 10.0) == 0
        for item in (memory.item([0, 0], [0, 8], [5, -5]), memory.item([SIZE + 1], [0], [0])):
            with pytest.raises(LLMException) as excinfo:
                transport.write([item], 10.0)
            assert_param_invalid(excinfo, "peer pid")
    finally:
        transport.close()
    assert memory.untouched()


@pytest.mark.parametrize("name", sorted(TRANSPORTS))
@pytest.mark.parametrize("direction", ["read", "write"])
def test_transport_valid_edges_byte_exact(name, direction):
    memory = Memory()
    transport = TRANSPORTS[name]()
    items = [memory.item([SIZE - 32, SIZE, 0], [0, SIZE, SIZE - 8], [32, 0, 8]),
             memory.item([], [], [])]
    try:
        assert getattr(transport, direction)(items, 10.0) == 40
    finally:
        transport.close()
    remote, local = memory.before[0].clone(), memory.before[1].clone()
    if direction == "read":
        local[:32] = remote[SIZE - 32:]
        local[SIZE - 8:] = remote[:8]
    else:
        remote[SIZE - 32:] = local[:32]
        remote[:8] = local[SIZE - 8:]
    assert torch.equal(memory.remote, remote) and torch.equal(memory.local, local)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_addresses_for_other_backends_are_checked(case):
    """`Segments.addresses` (how Mooncake gets its addresses) refuses what a copy refuses."""
    memory = Memory()
    offset, length = HOSTILE[case]
    peer = Peer(4321, same_process=False, same_host=False)
    for item in (memory.item([0, offset], [0, 0], [8, length]),
                 memory.item([0, 0], [0, offset], [8, length])):
        segments = check_items(peer, [item])
        with pytest.raises(LLMException) as excinfo:
            segments.addresses([memory.remote.data_ptr()], [memory.local.data_ptr()])
        assert_param_invalid(excinfo, "peer pid 4321", "item 0's segment 1")
    remote, local = check_items(peer, [memory.item([SIZE - 8, SIZE], [0, SIZE], [8, 0])]).addresses(
        [memory.remote.data_ptr()], [memory.local.data_ptr()])
    assert remote.tolist() == [memory.remote.data_ptr() + SIZE - 8, memory.remote.data_ptr() + SIZE]
    assert local.tolist() == [memory.local.data_ptr(), memory.local.data_ptr() + SIZE]
