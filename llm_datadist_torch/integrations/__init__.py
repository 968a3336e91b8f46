"""Integrations of `llm_datadist_torch` into serving engines.

They sit on top of the package and use only its public API (the names of the top-level
`llm_datadist_torch` module); nothing in the package imports them, and each needs its engine
installed (`pip install "llm_datadist_torch[vllm]"` for `integrations.vllm`).
"""
