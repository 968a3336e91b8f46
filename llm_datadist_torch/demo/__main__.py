"""`python -m llm_datadist_torch.demo [--requests N ...] [--json]`: exit 0 on MATCH, 1 on a
mismatch, 2 when the run itself failed."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

import torch

from .model import ModelConfig
from .orchestrate import ChildFailed, run_disaggregated
from .reference import run_reference
from .report import Progress, compare, render, summarize
from .workload import DemoConfig, make_prompts


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    d, m = DemoConfig(), ModelConfig()
    parser = argparse.ArgumentParser(
        prog="python -m llm_datadist_torch.demo",
        description="Prefill/decode disaggregated serving of a tiny transformer on this host: decode "
                    "pulls the KV blocks from prefill with pull_blocks; the tokens must equal a "
                    "single-process run. Exit code 0 on MATCH, 1 on a mismatch, 2 when the run failed.")
    add = parser.add_argument
    add("--requests", type=int, default=d.requests, help="concurrent requests (%(default)s)")
    add("--prompt-len", type=int, default=d.prompt_len,
        help="longest prompt; the others are between half of it and it (%(default)s)")
    add("--new-tokens", type=int, default=d.new_tokens,
        help="tokens decode generates per request, after prefill's first one (%(default)s)")
    add("--layers", type=int, default=m.layers, help="%(default)s")
    add("--heads", type=int, default=m.heads, help="%(default)s")
    add("--kv-heads", type=int, default=None, help="K/V heads (default: half the heads, at least 1)")
    add("--head-dim", type=int, default=m.head_dim, help="%(default)s")
    add("--vocab", type=int, default=m.vocab, help="%(default)s")
    add("--block-size", type=int, default=m.block_size, help="tokens per KV block (%(default)s)")
    add("--seed", type=int, default=m.seed, help="weights and prompts (%(default)s)")
    add("--max-batch", type=int, default=d.max_batch, help="requests decode runs at once (%(default)s)")
    add("--prefill-capacity", type=int, default=d.prefill_capacity,
        help="requests prefill's cache holds; later ones reuse freed blocks (%(default)s)")
    add("--layer-chunk", type=int, default=d.layer_chunk,
        help="layers per pull_blocks call (default: half of them)")
    add("--timeout", type=float, default=d.timeout_s, help="seconds for the whole run (%(default)s)")
    add("--json", action="store_true", help="print the report as one JSON object")
    add("--no-progress", action="store_true", help="no progress line on stderr")
    add("--corrupt-block", action="store_true", help=argparse.SUPPRESS)  # tests only
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> DemoConfig:
    kv_heads = args.kv_heads or max(1, args.heads // 2)
    model = ModelConfig(vocab=args.vocab, layers=args.layers, heads=args.heads, kv_heads=kv_heads,
                        head_dim=args.head_dim, block_size=args.block_size, seed=args.seed)
    return DemoConfig(model=model, requests=args.requests, prompt_len=args.prompt_len,
                      new_tokens=args.new_tokens, max_batch=args.max_batch,
                      prefill_capacity=args.prefill_capacity, layer_chunk=args.layer_chunk,
                      timeout_s=args.timeout, corrupt_block=args.corrupt_block)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prompts = make_prompts(config)

    progress = Progress(config.requests, enabled=False if args.no_progress else None)
    start = time.perf_counter()
    try:
        prefill, decode = run_disaggregated(config, prompts, progress)
    except ChildFailed as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress.close()
    disaggregated_s = time.perf_counter() - start

    # Same thread count as the children: identical kernels, identical bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        reference = run_reference(config, prompts)
        reference_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    diffs = compare(reference, decode["outputs"])
    summary = summarize(config, prompts, prefill, decode, diffs, disaggregated_s, reference_s)
    print(json.dumps(summary) if args.json else render(summary))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
