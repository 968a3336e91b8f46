"""Prefill/decode disaggregated serving of a tiny transformer on this host, for real.

`python -m llm_datadist_torch.demo` starts a prefill process and a decode process; decode pulls
each request's KV blocks from prefill with `pull_blocks`, generates greedily, and the tokens
(and the logits' bits) must equal a single-process run of the same model. `--help` for sizes.

Modules, one job each: `model` (the transformer), `paged_cache` (KV blocks and their allocator),
`workload` (settings and prompts), `channel` (the side channel for block tables), `prefill` and
`decode` (the two processes), `reference` (the single-process run), `orchestrate` (spawning and
cleaning up), `report` (comparison, report, progress), `__main__` (the command line).
"""
