"""`python -m llm_datadist_torch.demo` end to end: a prefill and a decode process, KV pulled with
pull_blocks, tokens compared with a single-process run. Small sizes, bounded time."""
import json
import subprocess
import sys

import pytest

from llm_datadist_torch.demo.paged_cache import BlockAllocator, PagedKVCache, blocks_for
from llm_datadist_torch.demo.workload import DemoConfig, make_prompts
from llm_datadist_torch.demo.model import ModelConfig

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

SMALL = dict(requests=4, prompt_len=40, new_tokens=6, layers=2, heads=4, kv_heads=2, head_dim=16,
             vocab=256, block_size=8, prefill_capacity=1, max_batch=2)
RUN_TIMEOUT_S = 120


def run_demo(*extra: str) -> subprocess.CompletedProcess:
    args = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL.items()]
    return subprocess.run([sys.executable, "-m", "llm_datadist_torch.demo", *args, "--timeout=60",
                           "--no-progress", *extra],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def small_config() -> DemoConfig:
    model = ModelConfig(**{k: SMALL[k] for k in ("layers", "heads", "kv_heads", "head_dim", "vocab",
                                                 "block_size")})
    return DemoConfig(model=model, **{k: SMALL[k] for k in ("requests", "prompt_len", "new_tokens",
                                                            "prefill_capacity", "max_batch")})


def test_disaggregated_run_matches_single_process():
    proc = run_demo("--json")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    report = json.loads(proc.stdout)
    assert report["result"] == "MATCH" and report["diffs"] == []

    config = small_config()
    prompts = make_prompts(config)
    block_bytes = 2 * SMALL["layers"] * SMALL["block_size"] * SMALL["kv_heads"] * SMALL["head_dim"] * 4
    assert report["prompt_tokens"] == sum(len(p) for p in prompts)
    assert report["generated_tokens"] == SMALL["requests"] * (1 + SMALL["new_tokens"])
    # every prompt block went through pull_blocks, once, in two layer ranges
    assert report["kv_bytes_moved"] == sum(blocks_for(len(p), SMALL["block_size"]) for p in prompts) * block_bytes
    assert report["layer_ranges"] == [[0, 1], [1, 2]]
    assert report["pull_blocks_calls"] == 2 * SMALL["requests"]
    # prefill's cache holds one request: the others had to reuse its freed blocks
    assert report["prefill_blocks_reused"] > 0
    assert report["first_decode_token_ms_max"] > 0 and report["decode_tokens_per_s"] > 0


def test_corrupted_transfer_is_reported_as_mismatch():
    proc = run_demo("--corrupt-block")      # decode zeroes one pulled block of request 0
    assert proc.returncode == 1, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "MISMATCH"
    assert any(line.strip().startswith("request 0:") for line in lines), proc.stdout
    assert not any(line.strip().startswith(("request 1:", "request 2:", "request 3:")) for line in lines)


def test_bad_arguments_fail_without_starting_processes():
    proc = run_demo("--heads=3")            # 3 heads, 2 KV heads: not a multiple
    assert proc.returncode == 2 and "multiple of kv_heads" in proc.stderr


def test_block_allocator_reuses_freed_blocks_and_cache_registers_k_v_per_layer():
    allocator = BlockAllocator(4)
    first = allocator.allocate(3)
    assert allocator.allocate(2) is None            # not enough: the caller waits
    allocator.free(first)
    assert sorted(allocator.allocate(4)) == [0, 1, 2, 3] and allocator.reused == 3
    cache = PagedKVCache(layers=2, num_blocks=3, block_size=4, kv_heads=2, head_dim=8)
    assert cache.addrs() == [cache.k[0].data_ptr(), cache.v[0].data_ptr(),
                             cache.k[1].data_ptr(), cache.v[1].data_ptr()]
    assert cache.cache_desc().num_tensors == 4 and cache.cache_desc().shape == [3, 4, 2, 8]
    # position p of a request lives in block table[p // block_size], offset p % block_size
    assert cache.slots([2, 0], 3, 6).tolist() == [2 * 4 + 3, 0 * 4 + 0, 0 * 4 + 1]
