"""The C++ extension llm_datadist_torch._C, exercised on real memory and a real child process."""
import ctypes
import errno
import functools
import mmap
import multiprocessing
import os
import random
import subprocess
import sys

import pytest
import torch

from llm_datadist_torch import _C

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _raw_mmap(nbytes, prot=mmap.PROT_READ | mmap.PROT_WRITE):
    addr = _libc.mmap(None, nbytes, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    return addr


@pytest.fixture
def pages():
    """Maps raw anonymous pages; unmaps whatever is left at the end."""
    maps = []

    def make(count, prot=mmap.PROT_READ | mmap.PROT_WRITE):
        addr = _raw_mmap(count * PAGE, prot)
        maps.append((addr, count * PAGE))
        return addr

    yield make
    for addr, nbytes in maps:
        _libc.munmap(addr, nbytes)


def _i64(values):
    return torch.tensor(values, dtype=torch.int64)


def _table(*regions):
    """A region table: rows of (base address, size), given as tensors or (base, size) pairs."""
    rows = [(r.data_ptr(), r.nbytes) if isinstance(r, torch.Tensor) else r for r in regions]
    return _i64(rows).view(-1, 2)


def _zeros(n):
    return torch.zeros(n, dtype=torch.int64)


def _copy(src, dst, s_off, d_off, lengths, *more):
    """copy_segments between two whole tensors (one region per side)."""
    index = _zeros(len(lengths))
    return _C.copy_segments(_table(src), index, _i64(s_off), _table(dst), index, _i64(d_off),
                            _i64(lengths), *more)


def _cma(call, pid, local, l_off, remote, r_off, lengths, *more, r_index=None):
    """cma_read / cma_write between one local tensor and remote region(s) (base, size)."""
    remotes = remote if isinstance(remote, list) else [remote]
    r_index = _zeros(len(lengths)) if r_index is None else _i64(r_index)
    return call(pid, _table(local), _zeros(len(lengths)), _i64(l_off), _table(*remotes), r_index,
                _i64(r_off), _i64(lengths), *more)


# ---------------------------------------------------------------- registry


def test_registry_defaults_and_set_limits():
    reg = _C.MemoryRegistry()
    assert reg.limits() == (240, 50 * 10**9, 20 * 10**9)
    reg.set_limits(10, 2000, 1000)
    assert reg.limits() == (10, 2000, 1000)
    with pytest.raises(_C.RegistryError):
        reg.set_limits(-1, 1, 1)
    assert issubclass(_C.RegistryError, ValueError)


def test_registry_address_limit_single_registration():
    buf = torch.zeros(241 * 64, dtype=torch.uint8)
    addrs = [buf.data_ptr() + 64 * i for i in range(241)]
    reg = _C.MemoryRegistry()
    with pytest.raises(_C.RegistryError, match="241 addresses.*limit of 240"):
        reg.register(1, addrs, 64, False, True)
    assert reg.address_count() == 0 and reg.cache_ids() == []
    reg.register(1, addrs[:240], 64, False, True)
    assert reg.address_count() == 240


def test_registry_address_limit_across_registrations_leaves_first_unchanged():
    buf = torch.zeros(241 * 64, dtype=torch.uint8)
    addrs = [buf.data_ptr() + 64 * i for i in range(241)]
    reg = _C.MemoryRegistry()
    reg.register(1, addrs[:200], 64, False, True)
    with pytest.raises(_C.RegistryError, match="cache_id 2"):
        reg.register(2, addrs[200:], 64, False, True)
    assert reg.cache_ids() == [1]
    assert reg.address_count() == 200
    assert reg.registered_bytes(False) == 200 * 64
    assert reg.covers(addrs[0], 64) and not reg.covers(addrs[240], 1)
    reg.register(2, addrs[200:240], 64, False, True)
    assert reg.address_count() == 240


def test_registry_byte_caps_per_kind():
    buf = torch.zeros(8192, dtype=torch.uint8)
    base = buf.data_ptr()
    reg = _C.MemoryRegistry()
    reg.set_limits(240, 1000, 500)
    with pytest.raises(_C.RegistryError, match="host memory.*limit of 500"):
        reg.register(1, [base, base + 256], 256, False, True)
    # identical ranges inside one registration count once for bytes, twice for addresses
    reg.register(1, [base, base], 300, False, True)
    assert reg.registered_bytes(False) == 300 and reg.address_count() == 2
    with pytest.raises(_C.RegistryError, match="host memory"):
        reg.register(2, [base + 1000], 201, False, True)
    # device bytes have their own cap; device addresses are not checked against host mappings
    reg.register(3, [0x7000_0000_0000 + 250 * i for i in range(4)], 250, True, False)
    assert reg.registered_bytes(True) == 1000
    with pytest.raises(_C.RegistryError, match="device memory"):
        reg.register(4, [0x7100_0000_0000], 1, True, False)
    assert reg.cache_ids() == [1, 3]


def test_registry_overlap_across_registrations():
    buf = torch.zeros(4096, dtype=torch.uint8)
    a = buf.data_ptr()
    reg = _C.MemoryRegistry()
    reg.register(1, [a + 1000], 100, False, True)
    for start in (a + 1050, a + 950, a + 1000, a + 999):
        with pytest.raises(_C.RegistryError, match=hex(start)):
            reg.register(2, [start], 100, False, True)
    # a larger range swallowing the existing one
    with pytest.raises(_C.RegistryError, match="registered by cache_id 1"):
        reg.register(2, [a], 4096, False, True)
    assert reg.cache_ids() == [1]
    reg.register(2, [a + 900, a + 1100], 100, False, True)  # touching both ends is fine
    assert reg.cache_ids() == [1, 2]


def test_registry_overlap_inside_one_registration():
    buf = torch.zeros(4096, dtype=torch.uint8)
    a = buf.data_ptr()
    reg = _C.MemoryRegistry()
    with pytest.raises(_C.RegistryError, match="same registration"):
        reg.register(1, [a, a + 50], 100, False, True)
    reg.register(1, [a, a + 100, a], 100, False, True)
    assert reg.address_count() == 3 and reg.registered_bytes(False) == 200


@pytest.mark.parametrize(
    "addrs, nbytes, message",
    [
        ([], 64, "no addresses"),
        ([0x1000], 0, "must be positive"),
        ([0x1000], -8, "must be positive"),
        ([0x1000, 0], 64, "0x0 is null"),
        ([0xFFFF_FFFF_FFFF_FFF0], 32, "0xfffffffffffffff0.*wraps"),
        ([0x10], 16, r"\[0x10, 0x20\) is not mapped"),
    ],
)
def test_registry_rejects_bad_arguments(addrs, nbytes, message):
    reg = _C.MemoryRegistry()
    with pytest.raises(_C.RegistryError, match=message):
        reg.register(7, addrs, nbytes, False, True)
    assert reg.cache_ids() == [] and reg.address_count() == 0


def test_registry_duplicate_cache_id():
    buf = torch.zeros(256, dtype=torch.uint8)
    reg = _C.MemoryRegistry()
    reg.register(5, [buf.data_ptr()], 128, False, True)
    with pytest.raises(_C.RegistryError, match="cache_id 5 is already registered"):
        reg.register(5, [buf.data_ptr() + 128], 128, False, True)
    assert reg.address_count() == 1


def test_registry_host_mapping_checks(pages):
    reg = _C.MemoryRegistry()
    gone = pages(1)
    assert _libc.munmap(gone, PAGE) == 0
    with pytest.raises(_C.RegistryError, match=hex(gone)):
        reg.register(1, [gone], PAGE, False, True)
    assert not _C.is_mapped_rw(gone, 1)

    read_only = pages(2, mmap.PROT_READ)
    with pytest.raises(_C.RegistryError, match="readable and writable"):
        reg.register(1, [read_only], 64, False, True)
    assert not _C.is_mapped_rw(read_only, 64)

    # two adjacent mappings with different permissions, both rw, cover one range together
    split = pages(3)
    assert _libc.mprotect(split + PAGE, PAGE, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC) == 0
    assert _libc.mprotect(split + 2 * PAGE, PAGE, mmap.PROT_READ) == 0
    assert _C.is_mapped_rw(split, 2 * PAGE)
    assert not _C.is_mapped_rw(split, 2 * PAGE + 1)
    reg.register(1, [split + 100], 2 * PAGE - 100, False, True)
    with pytest.raises(_C.RegistryError):
        reg.register(2, [split + PAGE], PAGE + 1, False, True)
    # the same check is skipped when the caller asks for no host check (device memory)
    reg.register(2, [read_only], 64, True, False)
    assert reg.cache_ids() == [1, 2]

    assert not _C.is_mapped_rw(0x10, 16)
    assert not _C.is_mapped_rw(split, 0)


def test_registry_unregister_and_register_again():
    buf = torch.zeros(1024, dtype=torch.uint8)
    a = buf.data_ptr()
    reg = _C.MemoryRegistry()
    reg.register(1, [a, a + 512], 512, False, True)
    assert reg.unregister(1) is True
    assert reg.unregister(1) is False
    assert reg.address_count() == 0 and reg.registered_bytes(False) == 0
    assert not reg.covers(a, 1)
    reg.register(2, [a + 256], 512, False, True)  # overlaps the old ranges, which are gone
    reg.register(1, [a], 256, False, True)
    assert reg.cache_ids() == [1, 2]


def test_registry_covers():
    buf = torch.zeros(4096, dtype=torch.uint8)
    a = buf.data_ptr()
    reg = _C.MemoryRegistry()
    reg.register(1, [a, a + 1024], 512, False, True)
    reg.register(2, [a + 512], 512, False, True)
    assert reg.covers(a, 512)
    assert reg.covers(a + 100, 412)
    assert reg.covers(a + 1024 + 511, 1)
    assert reg.covers(a + 10, 0)
    assert not reg.covers(a, 513)
    assert not reg.covers(a + 256, 512)  # spans two adjacent registrations
    assert not reg.covers(a + 1536, 1)
    assert not reg.covers(a - 1, 2)
    assert not reg.covers(a, -1)
    assert not reg.covers(0xFFFF_FFFF_FFFF_FFFF, 2)


# ---------------------------------------------------------------- tensor_from_address


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8,
                                   torch.uint8, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [[], [0], [7], [3, 4, 5]])
def test_tensor_from_address_shares_memory(dtype, shape):
    source = torch.zeros(64, dtype=dtype)
    view = _C.tensor_from_address(source.data_ptr(), shape, dtype, torch.device("cpu"))
    assert view.dtype == dtype and list(view.shape) == shape and view.device.type == "cpu"
    assert view.is_contiguous()
    if view.numel() == 0:
        return
    assert view.data_ptr() == source.data_ptr()
    view.view(-1)[-1] = 1
    assert source[view.numel() - 1].item() == 1
    source[0] = 1
    assert view.view(-1)[0].item() == 1


def test_tensor_from_address_rejects_bad_arguments():
    buf = torch.zeros(16)
    cpu = torch.device("cpu")
    with pytest.raises(_C.RegistryError, match="null"):
        _C.tensor_from_address(0, [4], torch.float32, cpu)
    with pytest.raises(_C.RegistryError, match="negative dimension"):
        _C.tensor_from_address(buf.data_ptr(), [4, -1], torch.float32, cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_from_address_cuda():
    source = torch.arange(32, dtype=torch.float32, device="cuda")
    view = _C.tensor_from_address(source.data_ptr(), [4, 8], torch.float32, torch.device("cuda"))
    assert view.device == source.device
    view[3, 7] = -1
    assert source[31].item() == -1


# ---------------------------------------------------------------- copy_segments


def _random_segments(rng, src_size, dst_size, lengths):
    """Segments with random sources and non-overlapping destinations, in random order."""
    src, dst, pos = [], [], 0
    for n in lengths:
        pos += rng.randrange(0, 64)
        src.append(rng.randrange(0, src_size - n + 1))
        dst.append(pos)
        pos += n
    assert pos <= dst_size
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return [src[i] for i in order], [dst[i] for i in order], [lengths[i] for i in order]


def _check_copy_against_reference(src, dst, s_off, d_off, lengths, max_threads):
    """One native copy_segments call gives what slice assignments in order give."""
    expected = dst.clone()
    for s, d, n in zip(s_off, d_off, lengths):
        expected[d:d + n] = src[s:s + n]
    assert _copy(src, dst, s_off, d_off, lengths, max_threads) == sum(lengths)
    assert torch.equal(dst, expected)


@pytest.mark.parametrize("max_threads", [1, 2, 3])
def test_copy_segments_matches_reference(max_threads):
    rng = random.Random(max_threads)
    size = 16 << 20
    src = torch.randint(0, 256, (size,), dtype=torch.uint8)
    dst = torch.randint(0, 256, (size,), dtype=torch.uint8)
    # > 12 MiB in total, so up to 3 threads take a share (each needs 4 MiB)
    lengths = [0, 1, 7, 0, 4096, 11 << 20, 100_000] + [rng.randrange(0, 70_000) for _ in range(40)]
    _check_copy_against_reference(src, dst, *_random_segments(rng, size, size, lengths),
                                  max_threads)


@pytest.mark.parametrize("max_threads", [1, 2])
def test_copy_segments_streaming_batch_matches_reference(max_threads):
    """>= 32 MiB in total (kStreamMinBytes): non-temporal stores, whose unaligned heads, short
    segments and odd tails must still land byte-exact."""
    rng = random.Random(10 + max_threads)
    size = 40 << 20
    src = torch.randint(0, 256, (size,), dtype=torch.uint8)
    dst = torch.randint(0, 256, (size,), dtype=torch.uint8)
    lengths = [0, 1, 31, 32, 33, 127, 128, 129, 16 << 10, (33 << 20) + 77]
    lengths += [rng.randrange(0, 300) for _ in range(200)]
    lengths += [rng.randrange(0, 70_000) | 1 for _ in range(60)]
    _check_copy_against_reference(src, dst, *_random_segments(rng, size, size, lengths),
                                  max_threads)


@pytest.mark.parametrize("count", [65, 600, 5000])
def test_copy_segments_sorted_over_several_regions(count):
    """Many segments in random order over several regions per side: sorted by source address
    natively (comparison sort, then radix sort from 1024 on), still byte-exact."""
    rng = random.Random(count)
    block = 256
    srcs = [torch.randint(0, 256, (count * block,), dtype=torch.uint8) for _ in range(3)]
    dsts = [torch.zeros(count * block, dtype=torch.uint8) for _ in range(2)]
    s_index = [rng.randrange(3) for _ in range(count)]
    s_off = [rng.randrange(count) * block + rng.randrange(8) for _ in range(count)]
    d_slots = rng.sample(range(2 * count), count)  # distinct destination blocks
    d_index = [slot % 2 for slot in d_slots]
    d_off = [slot // 2 * block for slot in d_slots]
    lengths = [rng.randrange(block - 8) for _ in range(count)]
    expected = [d.clone() for d in dsts]
    for si, so, di, do, n in zip(s_index, s_off, d_index, d_off, lengths):
        expected[di][do:do + n] = srcs[si][so:so + n]
    total = _C.copy_segments(_table(*srcs), _i64(s_index), _i64(s_off), _table(*dsts),
                             _i64(d_index), _i64(d_off), _i64(lengths), 2)
    assert total == sum(lengths)
    for got, want in zip(dsts, expected):
        assert torch.equal(got, want)


def test_copy_segments_unsorted_keeps_list_order():
    """sort=False with one thread: segments that depend on each other see each other."""
    buf = torch.arange(256, dtype=torch.uint8)
    count = 100  # above the sorting threshold
    # Each segment copies the byte the previous one wrote: a chain only list order keeps.
    _copy(buf, buf, list(range(count)), list(range(1, count + 1)), [1] * count, 1, False)
    assert buf[:count + 1].eq(0).all() and torch.equal(buf[count + 1:],
                                                        torch.arange(count + 1, 256).byte())


def test_copy_segments_single_huge_segment_is_split():
    src = torch.randint(0, 256, (9 << 20,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    _copy(src, dst, [3], [5], [(9 << 20) - 8], 2)
    assert torch.equal(dst[5:-3], src[3:-5])
    assert dst[:5].eq(0).all() and dst[-3:].eq(0).all()


def test_copy_segments_empty_and_zero_length():
    buf = torch.zeros(8, dtype=torch.uint8)
    assert _copy(buf, buf, [], [], []) == 0
    # zero bytes from a zero-byte region at an address that is not mapped: nothing is touched
    assert _C.copy_segments(_table((0x10, 0)), _zeros(1), _i64([0]), _table(buf), _zeros(1),
                            _i64([8]), _i64([0])) == 0
    assert buf.eq(0).all()


def test_copy_segments_argument_checks():
    ok, table = _i64([0]), _table((0x1000, 8))
    with pytest.raises(TypeError, match="int64"):
        _C.copy_segments(table, ok, torch.tensor([0.0]), table, ok, ok, ok)
    with pytest.raises(TypeError, match="src_regions must be an int64"):
        _C.copy_segments(table.double(), ok, ok, table, ok, ok, ok)
    with pytest.raises(ValueError, match="same length"):
        _C.copy_segments(table, ok, ok, table, ok, _i64([0, 0]), ok)
    with pytest.raises(ValueError, match="1-D contiguous"):
        _C.copy_segments(table, _i64([[0]]), ok, table, ok, ok, ok)
    with pytest.raises(ValueError, match="1-D contiguous"):
        _C.copy_segments(table, ok, _i64([0, 0, 0, 0])[::2], table, ok, ok, ok)
    with pytest.raises(ValueError, match=r"dst_regions must be a contiguous \[R, 2\]"):
        _C.copy_segments(table, ok, ok, _i64([0x1000, 8]), ok, ok, ok)
    with pytest.raises(ValueError, match=r"\[R, 2\]"):
        _C.copy_segments(table, ok, ok, _i64([[0x1000, 8, 0]]), ok, ok, ok)
    with pytest.raises(_C.SegmentRangeError, match="negative length"):
        _C.copy_segments(table, ok, ok, table, ok, ok, _i64([-1]))
    with pytest.raises(ValueError, match="max_threads"):
        _C.copy_segments(table, ok, ok, table, ok, ok, _i64([0]), 0)


# ---------------------------------------------------------------- CMA

CHILD_SIZE = 1 << 20
TIMEOUT_S = 30


@functools.lru_cache(maxsize=None)
def _pattern(size):
    return bytes((i * 7 + i // 256) % 256 for i in range(size))


def _child_main(conn):
    """Holds a buffer at a fixed address; answers 'dump' with its contents until 'quit'."""
    buf = bytearray(_pattern(CHILD_SIZE))
    addr = ctypes.addressof((ctypes.c_char * CHILD_SIZE).from_buffer(buf))
    conn.send((os.getpid(), addr))
    while conn.poll(TIMEOUT_S):
        if conn.recv() == "quit":
            return
        conn.send(bytes(buf))


@pytest.fixture(scope="module")
def child():
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_child_main, args=(child_end,), daemon=True)
    proc.start()
    try:
        assert parent_end.poll(TIMEOUT_S), "child did not report its buffer"
        pid, addr = parent_end.recv()
        assert pid == proc.pid

        def dump():
            parent_end.send("dump")
            assert parent_end.poll(TIMEOUT_S), "child did not answer"
            return parent_end.recv()

        yield pid, addr, dump
        parent_end.send("quit")
        proc.join(TIMEOUT_S)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(TIMEOUT_S)


def test_cma_read_segments(child):
    pid, addr, _ = child
    rng = random.Random(1)
    lengths = [0, 1, 5000, 0, 70_000, 300_000] + [rng.randrange(0, 3000) for _ in range(50)]
    remote, local, lengths = _random_segments(rng, CHILD_SIZE, 1 << 20, lengths)
    out = torch.zeros(1 << 20, dtype=torch.uint8)
    assert _cma(_C.cma_read, pid, out, local, (addr, CHILD_SIZE), remote, lengths) == sum(lengths)
    pattern = torch.frombuffer(bytearray(_pattern(CHILD_SIZE)), dtype=torch.uint8)
    expected = torch.zeros_like(out)
    for r, l, n in zip(remote, local, lengths):
        expected[l:l + n] = pattern[r:r + n]
    assert torch.equal(out, expected)


def test_cma_read_more_segments_than_iov_max(child):
    pid, addr, _ = child
    count = 2500  # three syscalls' worth of iovecs
    out = torch.zeros(count * 16, dtype=torch.uint8)
    remote = [(i * 389) % (CHILD_SIZE - 16) for i in range(count)]
    # more than 1024 segments in random remote order: radix-sorted by remote address first
    _cma(_C.cma_read, pid, out, range(0, count * 16, 16), (addr, CHILD_SIZE), remote, [16] * count)
    pattern = _pattern(CHILD_SIZE)
    assert bytes(out.numpy()) == b"".join(pattern[r:r + 16] for r in remote)


@pytest.mark.parametrize("max_threads", [1, 2])
def test_cma_read_split_over_threads(child, max_threads):
    """>= 8 MiB in total, so two threads each take a share, cut inside a segment."""
    pid, addr, _ = child
    rng = random.Random(20 + max_threads)
    lengths = [CHILD_SIZE - 3, 0, 1, 129] + [rng.randrange(1, CHILD_SIZE) | 1 for _ in range(20)]
    remote, local, lengths = _random_segments(rng, CHILD_SIZE, 16 << 20, lengths)
    assert sum(lengths) >= 8 << 20
    out = torch.zeros(16 << 20, dtype=torch.uint8)
    _cma(_C.cma_read, pid, out, local, (addr, CHILD_SIZE), remote, lengths, max_threads)
    pattern = torch.frombuffer(bytearray(_pattern(CHILD_SIZE)), dtype=torch.uint8)
    expected = torch.zeros_like(out)
    for r, l, n in zip(remote, local, lengths):
        expected[l:l + n] = pattern[r:r + n]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("bad_share", [0, 1])
def test_cma_error_in_one_thread_is_raised_once_both_are_done(child, bad_share):
    """The share on the calling thread (0) or on the extra thread (1) fails: the other share
    still completes before the errno-carrying OSError comes out."""
    pid, addr, _ = child
    count = 10  # 10 MiB: two shares of five segments
    lengths = [CHILD_SIZE] * count
    r_index = [0] * count
    bad = 0 if bad_share == 0 else count - 1
    r_index[bad] = 1  # a region the peer claims but has not mapped
    out = torch.zeros(count * CHILD_SIZE, dtype=torch.uint8)
    with pytest.raises(OSError) as info:
        _cma(_C.cma_read, pid, out, range(0, count * CHILD_SIZE, CHILD_SIZE),
             [(addr, CHILD_SIZE), (0x10, CHILD_SIZE)], [0] * count, lengths, 2, r_index=r_index)
    assert info.value.errno == errno.EFAULT and str(pid) in str(info.value)
    good = out[CHILD_SIZE * (count // 2):] if bad_share == 0 else out[:CHILD_SIZE * (count // 2)]
    assert torch.equal(good.view(-1, CHILD_SIZE)[0],
                       torch.frombuffer(bytearray(_pattern(CHILD_SIZE)), dtype=torch.uint8))
    assert torch.equal(good.view(-1, CHILD_SIZE), good.view(-1, CHILD_SIZE)[:1].expand(count // 2, -1))


def test_cma_write_then_child_sees_it(child):
    pid, addr, dump = child
    before = dump()
    data = torch.randint(0, 256, (200_000,), dtype=torch.uint8)
    remote = [10, 100_000, CHILD_SIZE - 1000, 5000]
    local = [0, 20_000, 150_000, 199_000]
    lengths = [4000, 50_000, 1000, 0]
    _cma(_C.cma_write, pid, data, local, (addr, CHILD_SIZE), remote, lengths)
    expected = bytearray(before)
    raw = bytes(data.numpy())
    for r, l, n in zip(remote, local, lengths):
        expected[r:r + n] = raw[l:l + n]
    assert dump() == bytes(expected)
    # put the pattern back for the other tests
    original = torch.frombuffer(bytearray(before), dtype=torch.uint8)
    _cma(_C.cma_write, pid, original, [0], (addr, CHILD_SIZE), [0], [CHILD_SIZE])
    assert dump() == before


def test_cma_bad_remote_address_is_efault(child):
    pid, addr, _ = child
    out = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(OSError) as info:
        _cma(_C.cma_read, pid, out, [0], (0x10, 64), [0], [64])
    assert info.value.errno == errno.EFAULT
    assert str(pid) in str(info.value) and os.strerror(errno.EFAULT) in str(info.value)
    # a good segment before a bad one is copied, then the bad one fails
    with pytest.raises(OSError) as info:
        _cma(_C.cma_read, pid, out, [0, 32], [(addr, CHILD_SIZE), (0x10, 32)], [0, 0], [32, 32],
             r_index=[0, 1])
    assert info.value.errno == errno.EFAULT
    assert bytes(out[:32].numpy()) == _pattern(32)
    with pytest.raises(OSError) as info:
        _cma(_C.cma_write, pid, out, [0], (0x10, 64), [0], [64])
    assert info.value.errno == errno.EFAULT


def test_cma_fault_inside_a_segment_keeps_the_bytes_before_it(pages):
    # One iovec whose second page is unmapped: the kernel stops mid-iovec, the resumed call
    # starts at the hole and reports EFAULT.
    src = pages(2)
    ctypes.memset(src, 0xAB, PAGE)
    assert _libc.munmap(src + PAGE, PAGE) == 0
    out = torch.zeros(2 * PAGE, dtype=torch.uint8)
    with pytest.raises(OSError) as info:
        _cma(_C.cma_read, os.getpid(), out, [0], (src, 2 * PAGE), [0], [2 * PAGE])
    assert info.value.errno == errno.EFAULT
    assert out[:PAGE].eq(0xAB).all() and out[PAGE:].eq(0).all()


def test_cma_dead_pid_is_esrch():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(TIMEOUT_S) == 0  # reaped: the pid is gone
    pid = proc.pid
    out = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ProcessLookupError) as info:
        _cma(_C.cma_read, pid, out, [0], (out.data_ptr(), 8), [0], [8])
    assert info.value.errno == errno.ESRCH
    assert f"pid {pid}" in str(info.value)
    for bad in (0, -5, 1 << 40):  # never wrapped onto a real pid
        with pytest.raises(ProcessLookupError):
            _cma(_C.cma_read, bad, out, [0], (out.data_ptr(), 8), [0], [8])


def test_cma_argument_checks():
    ok, table = _i64([0]), _table((0x1000, 8))
    with pytest.raises(ValueError, match="same length"):
        _C.cma_read(os.getpid(), table, ok, ok, table, ok, _i64([]), ok)
    with pytest.raises(TypeError, match="int64"):
        _C.cma_write(os.getpid(), table, ok, ok, table, ok, ok,
                     torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"remote_regions must be a contiguous \[R, 2\]"):
        _C.cma_read(os.getpid(), table, ok, ok, ok, ok, ok, ok)
    with pytest.raises(ValueError, match="max_threads"):
        _C.cma_read(os.getpid(), table, ok, ok, table, ok, ok, _i64([0]), 0)


def test_allow_ptrace_from_does_not_raise():
    _C.allow_ptrace_from(os.getppid())
    _C.allow_ptrace_from(0)  # clears it again
