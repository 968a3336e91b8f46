"""Smoke tests of the bench's `model` suite at a tiny size: row fields, the bytes check, the fit
and the report's side-by-side table. No speed assertions."""
import argparse
import io

import pytest
import torch

from llm_datadist_torch.bench import model, model_report, model_shapes as ms
from llm_datadist_torch.bench.common import DataMismatch
from llm_datadist_torch.cache_manager import CacheManager

FIELDS = ("suite", "transport", "op", "tensors", "block_bytes", "blocks", "call_bytes", "calls",
          "p50_us", "p99_us", "gbps", "checked", "memcpy_gbps", "ratio")
TINY = argparse.Namespace(tensors=[2, 8], model_calls=1)


@pytest.mark.timeout(120)
@pytest.mark.multiprocess
def test_model_suite_tiny_rows_checked_and_fit():
    rows = model.run(TINY)
    measured = [r for r in rows if "p50_us" in r]
    shapes = {(s.tensors, s.block, s.k) for s in ms.plan((2, 8))}
    for transport, op in (("shm", "pull_blocks"), ("cma", "pull_blocks"), ("memcpy", "copy_")):
        got = [r for r in measured if r["transport"] == transport]
        assert {(r["tensors"], r["block_bytes"], r["blocks"]) for r in got} == shapes, transport
        for r in got:
            assert all(key in r for key in FIELDS), r
            assert r["suite"] == "model" and r["op"] == op and r["calls"] == 1, r
            assert r["checked"] is True, r
            assert r["call_bytes"] == r["tensors"] * r["blocks"] * r["block_bytes"], r
            assert 0 < r["p50_us"] <= r["p99_us"] and r["gbps"] > 0 and r["ratio"] > 0, r
    fits = [r for r in rows if r["op"] == "fit_p50_k1"]
    assert {(r["transport"], r["block_bytes"]) for r in fits} == {
        (t, b) for t in ("shm", "cma", "memcpy") for b in ms.BLOCK_SIZES}
    assert all(r["tensors"] == "2,8" and "fixed_us" in r and "per_tensor_us" in r for r in fits)

    out = io.StringIO()
    model_report.write(rows, out)
    text = out.getvalue()
    assert "## Model-shaped pulls" in text and "shm p50 / p99 µs" in text
    assert "shm GB/s / memcpy" in text and "fixed µs per call" in text


@pytest.mark.timeout(120)
@pytest.mark.multiprocess
def test_model_suite_catches_wrong_bytes(monkeypatch):
    """A pull that moves nothing must fail the bytes check, not be reported as fast."""
    monkeypatch.setattr(CacheManager, "pull_blocks", lambda self, *args, **kwargs: None)
    with pytest.raises(DataMismatch, match="model suite: shm pull_blocks"):
        model.measure(ms.plan((2,), (16 << 10,), (1,)), calls=1)


def test_pattern_marks_block_and_tensor():
    block = 16 << 10
    a = ms.expected_blocks(3, [0, 1], block, seed=1)
    assert a.shape == (2, block)
    assert not torch.equal(a[0], a[1])  # blocks differ
    assert not torch.equal(a, ms.expected_blocks(4, [0, 1], block, seed=1))  # tensors differ
    assert torch.equal(ms.pattern(3, block, block, 1), a[1])  # a range is its slice
    assert torch.equal(ms.pattern(3, 0, 2 * block, 1)[block:], a[1])


def test_block_sets_are_disjoint_and_fit_is_least_squares():
    for k in (1, 16):
        sets = ms.block_sets(16 << 10, k)
        assert all(len(s) == k for s in sets) and len(sets) == ms.SOURCE_BLOCKS // k
        assert sorted(b for s in sets for b in s) == list(range(ms.SOURCE_BLOCKS))
    fixed, per = ms.fit([(2, 14.0), (64, 138.0), (160, 330.0)])
    assert fixed == pytest.approx(10.0) and per == pytest.approx(2.0)
