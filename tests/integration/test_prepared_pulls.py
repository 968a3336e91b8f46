"""Prepared transfers across processes: call after call with other blocks, a decoder pulling
from another process's pool (shm) or registered memory (cma) gets exactly the planned bytes
through the transfer it prepared at its first pull, and nothing else in its cache changes."""
import random

import pytest

from agents import key
from checks import B_SHAPE, Model, start_pair

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

TENSORS = 4
BLOCKS = B_SHAPE[0]


@pytest.mark.parametrize("memory", ["pool", "registered"])
def test_random_block_pulls_move_exactly_the_planned_bytes(harness, memory):
    pair = start_pair(harness)
    if memory == "pool":
        pair.p.call("allocate", "kv", TENSORS, B_SHAPE, seed=11, blocks=True, model_id=0)
    else:
        pair.p.call("register", "kv", TENSORS, B_SHAPE, seed=11, model_id=0)
    pair.d.call("allocate", "kv", TENSORS, B_SHAPE, seed=12, blocks=True)
    src, dst = Model(11, TENSORS, B_SHAPE), Model(12, TENSORS, B_SHAPE)
    rng = random.Random(memory)
    for _ in range(12):
        count = rng.randint(1, BLOCKS)
        src_blocks = [rng.randrange(BLOCKS) for _ in range(count)]
        dst_blocks = rng.sample(range(BLOCKS), count)
        pair.d.call("pull_blocks", key("BlocksCacheKey", pair.pid, 0), "kv", src_blocks,
                    dst_blocks)
        for i in range(TENSORS):
            dst.t[i][dst_blocks] = src.t[i][src_blocks]
        dst.check(pair.d, "kv")
    assert pair.d.call("transports_used", pair.pid)[0] == ("shm" if memory == "pool" else "cma")
    src.check(pair.p, "kv")
    for child in (pair.p, pair.d):
        child.finish()
