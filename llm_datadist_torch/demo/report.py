"""Comparison with the reference, the report, and the progress line."""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Dict, List

from .workload import DemoConfig

DIGESTS = ("prefill_digest", "decode_digest")


def compare(reference: Dict[int, dict], outputs: Dict[int, dict]) -> List[str]:
    """One line per difference: missing requests, the first differing token, differing logits."""
    diffs = []
    for request_id in sorted(reference):
        want, got = reference[request_id], outputs.get(request_id)
        if got is None:
            diffs.append(f"request {request_id}: no output from the disaggregated run")
            continue
        if got["tokens"] != want["tokens"]:
            at = next((i for i, (a, b) in enumerate(zip(got["tokens"], want["tokens"])) if a != b),
                      min(len(got["tokens"]), len(want["tokens"])))
            diffs.append(f"request {request_id}: tokens differ from position {at}: "
                         f"disaggregated {got['tokens'][at:at + 8]} vs single-process "
                         f"{want['tokens'][at:at + 8]}")
        for name in DIGESTS:
            if got[name] != want[name]:
                diffs.append(f"request {request_id}: {name.split('_')[0]} logits are not "
                             f"bit-identical ({got[name][:12]} vs {want[name][:12]})")
    for request_id in sorted(set(outputs) - set(reference)):
        diffs.append(f"request {request_id}: not in the reference run")
    return diffs


def summarize(config: DemoConfig, prompts: List[List[int]], prefill: dict, decode: dict,
              diffs: List[str], disaggregated_s: float, reference_s: float) -> dict:
    ttft = decode["ttft_s"]
    lengths = [len(p) for p in prompts]
    return {
        "result": "MISMATCH" if diffs else "MATCH",
        "model": dataclasses.asdict(config.model),
        "requests": config.requests,
        "prompt_tokens": sum(lengths),
        "prompt_len_min": min(lengths),
        "prompt_len_max": max(lengths),
        "generated_tokens": sum(len(o["tokens"]) for o in decode["outputs"].values()),
        "decode_tokens": decode["decode_tokens"],
        "kv_bytes_moved": decode["kv_bytes"],
        "pull_blocks_calls": decode["pull_calls"],
        "layer_ranges": [[r.start, r.stop] for r in config.layer_ranges],
        "pull_blocks_s": decode["pull_s"],
        "pull_blocks_ms_mean": decode["pull_s"] / decode["pull_calls"] * 1e3,
        "transfer_gb_per_s": decode["kv_bytes"] / decode["pull_s"] / 1e9 if decode["pull_s"] else None,
        "first_decode_token_ms_mean": statistics.mean(ttft) * 1e3,
        "first_decode_token_ms_max": max(ttft) * 1e3,
        "decode_s": decode["decode_s"],
        "decode_tokens_per_s": decode["decode_tokens"] / decode["decode_s"],
        "link_ms": decode["link_ms"],
        "prefill_compute_s": prefill["compute_s"],
        "prefill_blocks": prefill["blocks"],
        "prefill_blocks_reused": prefill["blocks_reused"],
        "decode_blocks": decode["blocks"],
        "decode_blocks_reused": decode["blocks_reused"],
        "disaggregated_s": disaggregated_s,
        "reference_s": reference_s,
        "diffs": diffs,
    }


def render(s: dict) -> str:
    m = s["model"]
    lines = [
        f"model        {m['layers']} layers, {m['heads']} heads ({m['kv_heads']} KV heads) x {m['head_dim']}, "
        f"vocab {m['vocab']}, float32, block size {m['block_size']}, seed {m['seed']}",
        f"requests     {s['requests']}: {s['prompt_tokens']} prompt tokens ({s['prompt_len_min']}-"
        f"{s['prompt_len_max']} per request), {s['generated_tokens']} generated tokens "
        f"({s['decode_tokens']} by decode)",
        f"KV moved     {_bytes(s['kv_bytes_moved'])} in {s['pull_blocks_calls']} pull_blocks calls "
        f"(layer ranges {s['layer_ranges']}, {s['pull_blocks_ms_mean']:.2f} ms per call): "
        f"{_num(s['transfer_gb_per_s'])} GB/s inside pull_blocks",
        f"first token  decode's first token {s['first_decode_token_ms_mean']:.1f} ms mean, "
        f"{s['first_decode_token_ms_max']:.1f} ms max after prefill handed the request off "
        f"(queueing for a decode slot included)",
        f"decode       {s['decode_tokens']} tokens in {s['decode_s']:.2f} s: "
        f"{s['decode_tokens_per_s']:.0f} tokens/s (round-robin)",
        f"blocks       prefill {s['prefill_blocks']} ({s['prefill_blocks_reused']} allocations reused a "
        f"freed block), decode {s['decode_blocks']} ({s['decode_blocks_reused']} reused)",
        f"time         disaggregated run {s['disaggregated_s']:.1f} s (link {s['link_ms']:.0f} ms), "
        f"single-process reference {s['reference_s']:.1f} s",
    ]
    if s["diffs"]:
        lines += ["tokens or logits differ from the single-process run:"] + \
                 [f"  {d}" for d in s["diffs"]] + ["MISMATCH"]
    else:
        lines += ["tokens equal the single-process run's, logits bit-identical", "MATCH"]
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total_requests: int, enabled: bool = None):
        self.total = total_requests
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self.shown = False

    def __call__(self, done: int, tokens: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // max(1, self.total)
        sys.stderr.write(f"\rdecode [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                         f"requests, {tokens} tokens, {time.monotonic() - self.start:.1f} s")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
