"""llm_datadist_torch: the LLM-DataDist KV-cache API on plain PyTorch.

Code written for `llm_datadist` runs after ``import llm_datadist_torch as llm_datadist``.
"""
import os as _os

from ._logging import configure_package_logger as _configure_package_logger
from ._version import __version__
from .cache import Cache, KvCache
from .cache_desc import CacheDesc
from .cache_manager import CacheManager
from .configs import LLMClusterInfo, LLMConfig, LlmConfig
from .data_type import DataType
from .enums import LLMRole, Memtype, Placement, RegisterMemStatus
from .keys import BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex
from .kv_cache_manager import KvCacheManager
from .llm_datadist import LLMDataDist
from .status import LLMException, LLMStatusCode, Status
from .transfer_types import (CacheTask, LayerSynchronizer, MemInfo, TensorDesc, TransferConfig,
                             TransferWithCacheKeyConfig)
from torch import Tensor

_configure_package_logger()
# Upstream sets this NPU L2-cache switch at import; harmless elsewhere (spec §2.2).
_os.environ.setdefault("AUTO_USE_UC_MEMORY", "0")

v2_list = [
    "LLMClusterInfo", "LLMStatusCode", "LLMException", "LLMRole", "LlmConfig", "LLMConfig",
    "DataType", "Status", "CacheDesc", "CacheKey", "CacheKeyByIdAndIndex", "KvCache", "Cache",
    "BlocksCacheKey", "LLMDataDist", "Placement", "RegisterMemStatus", "LayerSynchronizer",
    "TransferConfig", "CacheTask", "TransferWithCacheKeyConfig", "Memtype", "MemInfo",
]
__all__ = v2_list + ["TensorDesc", "Tensor", "KvCacheManager", "CacheManager"]
