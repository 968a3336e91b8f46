"""Small helpers shared by the unit tests (imported as `helpers`: pytest puts this folder on
sys.path)."""
import contextlib

import pytest
import torch

from llm_datadist_torch import CacheDesc, DataType, LLMException, LLMStatusCode, Placement


@contextlib.contextmanager
def raises_llm(code=LLMStatusCode.LLM_PARAM_INVALID, match=None):
    """Expect an `LLMException` with status `code` (and a message matching `match`)."""
    with pytest.raises(LLMException, match=match) as info:
        yield info
    assert info.value.status_code == code, f"{info.value.status_code!r}: {info.value}"


def desc(num_tensors, shape, data_type=DataType.DT_UINT8, placement=Placement.DEVICE):
    return CacheDesc(num_tensors, list(shape), data_type, placement)


def raw(manager, cache, index=0) -> torch.Tensor:
    """Tensor `index` of `cache` as a flat uint8 view (aliases the cache memory)."""
    return manager.get_cache_tensors(cache, index)[0].reshape(-1).view(torch.uint8)


def pattern(nbytes: int, seed: int) -> torch.Tensor:
    """Reproducible pseudo-random bytes, distinct per seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
