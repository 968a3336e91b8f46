"""The one chunker behind the staging area and the bounce buffer: splitting keeps every byte
in place, chunks fill the buffer and never exceed it, in order."""
import pytest

from llm_datadist_torch.memory.chunks import pack, split_segments
from helpers import i64


def test_split_segments_keeps_every_byte_in_place():
    lengths, (remote, local) = split_segments(i64([250, 10, 101]), 100, i64([0, 1000, 50]),
                                              i64([7, 0, 3000]))
    assert list(zip(remote.tolist(), local.tolist(), lengths.tolist())) == [
        (0, 7, 100), (100, 107, 100), (200, 207, 50), (1000, 0, 10), (50, 3000, 100), (150, 3100, 1)]


def test_split_segments_returns_the_input_when_nothing_is_too_long():
    lengths, offsets = i64([10, 250]), i64([0, 10])
    got_lengths, (got_offsets,) = split_segments(lengths, 250, offsets)
    assert got_lengths is lengths and got_offsets is offsets


def test_split_segments_refuses_an_empty_piece_size():
    with pytest.raises(ValueError):
        split_segments(i64([1]), 0)


def test_pack_fills_the_buffer_and_never_exceeds_it():
    lists = [i64([30, 50, 60]), i64([64, 20])]
    chunks = list(pack(lists, 64))
    seen = []
    for chunk in chunks:
        used = [(int(packed[i]), int(lists[index][part][i])) for index, part, packed in chunk
                for i in range(part.stop - part.start)]
        assert max(start + length for start, length in used) <= 64
        assert sorted(used) == used and all(a[0] + a[1] <= b[0] for a, b in zip(used, used[1:]))
        seen += [(index, i) for index, part, _ in chunk for i in range(part.start, part.stop)]
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # every segment once, in order


def test_pack_refuses_a_segment_longer_than_the_buffer():
    with pytest.raises(ValueError):
        list(pack([i64([65])], 64))
