"""Benchmarks: `python -m llm_datadist_torch.bench [--suite NAME] [--json]`.

Each suite is a module with `run(args) -> list[dict]`, one dict per measurement, registered in
`__main__.SUITES`. Throughput rows carry `gbps` next to `memcpy_gbps`, a plain `copy_` of the
same number of bytes measured in the same run, so that numbers from different machines can be
read as a fraction of what the memory system does (`ratio`). GB/s means 1e9 bytes per second.
The `model` suite's rows are latencies per call (`p50_us`, `p99_us`) of model-shaped caches (K
and V per layer), with a `memcpy` row per shape and fits of the fixed and per-tensor cost.
"""
