"""Value types of the transfer APIs and the shared layer-range rules.

`LayerSynchronizer` (§16), `TransferConfig` (§17), `TransferWithCacheKeyConfig` (§18),
`CacheTask` (§19), `MemInfo` (§20), `TensorDesc` (§21.5), and the pull / strict forms of layer
ranges (§15.20).
"""
from __future__ import annotations

import abc
import threading
from typing import Dict, List, Optional, Sequence, Union

from ._checks import check_isinstance, check_list_uint64, check_uint32, check_uint64
from .data_type import DataType
from .enums import Memtype
from .keys import BlocksCacheKey, CacheKeyByIdAndIndex
from .status import LLMStatusCode, raise_if_false

# -- layer ranges (§15.20) ---------------------------------------------------------------------


def _check_range_type(layer_range, name: str) -> None:
    check_isinstance(name, layer_range, range)  # None passes


def _check_range_step(layer_range, name: str) -> None:
    if layer_range is not None:
        raise_if_false(layer_range.step == 1, "param check failed, %s step must be 1.", name)


def pull_layer_tensor_indices(layer_range: Optional[range], tensor_num_per_layer: int,
                              name: str) -> List[int]:
    """Pull form: layer range -> tensor indices ``[start*N, start*N + len*N)``.

    `None` and empty ranges give ``[]``. Not a range -> `TypeError`; step != 1 or a negative
    start -> `LLMException(PARAM)`; first/last layer not uint32 -> `ValueError`.
    `tensor_num_per_layer` is validated by the caller.
    """
    _check_range_type(layer_range, name)
    _check_range_step(layer_range, name)
    if layer_range is None or layer_range.stop <= layer_range.start:
        return []
    first, last = layer_range.start, layer_range.stop - 1  # no len(): it overflows on huge ranges
    raise_if_false(first >= 0, "%s is invalid, the start value:%s is < 0", name, first)
    check_uint32(name, first)
    check_uint32(name, last)
    start = first * tensor_num_per_layer
    return list(range(start, start + (last - first + 1) * tensor_num_per_layer))


def pull_layer_ranges_to_tensor_indices(src_layer_range: Optional[range],
                                        dst_layer_range: Optional[range],
                                        tensor_num_per_layer: int):
    """Both pull-form ranges at once, in upstream's check order (types, steps, then values).

    Returns ``(src_tensor_indices, dst_tensor_indices)``.
    """
    _check_range_type(src_layer_range, "src_layer_range")
    _check_range_type(dst_layer_range, "dst_layer_range")
    _check_range_step(src_layer_range, "src_layer_range")
    _check_range_step(dst_layer_range, "dst_layer_range")
    return (pull_layer_tensor_indices(src_layer_range, tensor_num_per_layer, "src_layer_range"),
            pull_layer_tensor_indices(dst_layer_range, tensor_num_per_layer, "dst_layer_range"))


def check_strict_layer_range(layer_range, name: str, allow_none: bool) -> None:
    """Strict form: a `range` with step 1 and ``0 <= start < stop`` (empty ranges are errors).

    `None` passes only when `allow_none`; otherwise, like any non-range, `TypeError`.
    """
    if layer_range is None and allow_none:
        return
    check_isinstance(name, layer_range, range, allow_none=False)
    raise_if_false(layer_range.step == 1, "check %s.step == 1 failed", name)
    raise_if_false(0 <= layer_range.start < layer_range.stop,
                   "check 0 <= range.start < range.stop failed, %s = %s", name, layer_range)


# -- LayerSynchronizer (§16) -----------------------------------------------------------------


class LayerSynchronizer(abc.ABC):
    """User hook called by `transfer_cache_async` before each source layer is sent."""

    @abc.abstractmethod
    def synchronize_layer(self, layer_index: int, timeout_in_millis: Optional[int]) -> bool:
        """Block until layer `layer_index` is computed; False aborts the task.

        `timeout_in_millis` is always None (not supported upstream).
        """


# -- TransferConfig (§17) --------------------------------------------------------------------


def _check_dst_addrs(dst_addrs) -> None:
    check_isinstance("dst_addrs", dst_addrs, [list, tuple], int, allow_none=False)
    check_list_uint64("dst_addrs", dst_addrs)


class TransferConfig:
    """A `transfer_cache_async` destination by raw remote addresses (2 per layer: K, V)."""

    def __init__(self, dst_cluster_id: int, dst_addrs: Sequence[int],
                 src_layer_range: Optional[range] = None, src_batch_index: int = 0):
        check_uint64("dst_cluster_id", dst_cluster_id)
        _check_dst_addrs(dst_addrs)
        check_strict_layer_range(src_layer_range, "src_layer_range", allow_none=True)
        check_uint32("src_batch_index", src_batch_index)
        self._dst_cluster_id = dst_cluster_id
        self._dst_addrs = dst_addrs
        self._src_layer_range = src_layer_range
        self._src_batch_index = src_batch_index
        self.dst_layer_range = None  # plain attribute, unused for this class (upstream)

    @property
    def dst_cluster_id(self) -> int:
        return self._dst_cluster_id

    @dst_cluster_id.setter
    def dst_cluster_id(self, dst_cluster_id: int) -> None:
        check_uint64("dst_cluster_id", dst_cluster_id)
        self._dst_cluster_id = dst_cluster_id

    @property
    def dst_addrs(self) -> Sequence[int]:
        return self._dst_addrs

    @dst_addrs.setter
    def dst_addrs(self, dst_addrs: Sequence[int]) -> None:
        _check_dst_addrs(dst_addrs)
        self._dst_addrs = dst_addrs

    @property
    def src_layer_range(self) -> Optional[range]:
        return self._src_layer_range

    @src_layer_range.setter
    def src_layer_range(self, src_layer_range: Optional[range]) -> None:
        check_strict_layer_range(src_layer_range, "src_layer_range", allow_none=True)
        self._src_layer_range = src_layer_range

    @property
    def src_batch_index(self) -> int:
        return self._src_batch_index

    @src_batch_index.setter
    def src_batch_index(self, src_batch_index: int) -> None:
        check_uint32("src_batch_index", src_batch_index)
        self._src_batch_index = src_batch_index

    def __repr__(self) -> str:
        return (f"TransferConfig(dst_cluster_id={self._dst_cluster_id}, "
                f"dst_addrs={self._dst_addrs}, src_layer_range={self._src_layer_range}, "
                f"src_batch_index={self._src_batch_index})")

    __str__ = __repr__


# -- TransferWithCacheKeyConfig (§18) --------------------------------------------------------

_DST_KEY_TYPES = [BlocksCacheKey, CacheKeyByIdAndIndex]


def _check_blocks_key_batch_index(cache_key, src_batch_index) -> None:
    raise_if_false(not (isinstance(cache_key, BlocksCacheKey) and src_batch_index != 0),
                   "src_batch_index should be 0 when cache_key is BlocksCacheKey.")


class TransferWithCacheKeyConfig:
    """A `transfer_cache_async` destination named by a remote key (remote-accessible mode)."""

    def __init__(self, cache_key: Union[BlocksCacheKey, CacheKeyByIdAndIndex],
                 src_layer_range: range = None, dst_layer_range: range = None,
                 src_batch_index: int = 0):
        check_isinstance("cache_key", cache_key, _DST_KEY_TYPES, allow_none=False)
        check_strict_layer_range(src_layer_range, "src_layer_range", allow_none=False)
        check_strict_layer_range(dst_layer_range, "dst_layer_range", allow_none=False)
        # Both are step-1 ranges here, so stop - start is the length (len() overflows on huge ones).
        raise_if_false(src_layer_range.stop - src_layer_range.start
                       == dst_layer_range.stop - dst_layer_range.start,
                       "src_layer_range size should be equal to dst_layer_range size")
        check_uint32("src_batch_index", src_batch_index)
        _check_blocks_key_batch_index(cache_key, src_batch_index)
        self._cache_key = cache_key
        self._src_layer_range = src_layer_range
        self._dst_layer_range = dst_layer_range
        self._src_batch_index = src_batch_index
        # Set once; the cache_key setter does not refresh it (upstream quirk, §26.14).
        self.dst_cluster_id = cache_key.cluster_id

    @property
    def cache_key(self):
        return self._cache_key

    @cache_key.setter
    def cache_key(self, cache_key) -> None:
        check_isinstance("cache_key", cache_key, _DST_KEY_TYPES)  # None passes
        self._cache_key = cache_key

    @property
    def src_layer_range(self) -> Optional[range]:
        return self._src_layer_range

    @src_layer_range.setter
    def src_layer_range(self, src_layer_range: Optional[range]) -> None:
        check_strict_layer_range(src_layer_range, "src_layer_range", allow_none=True)
        self._src_layer_range = src_layer_range

    @property
    def dst_layer_range(self) -> Optional[range]:
        return self._dst_layer_range

    @dst_layer_range.setter
    def dst_layer_range(self, dst_layer_range: Optional[range]) -> None:
        check_strict_layer_range(dst_layer_range, "dst_layer_range", allow_none=True)
        self._dst_layer_range = dst_layer_range

    @property
    def src_batch_index(self) -> int:
        return self._src_batch_index

    @src_batch_index.setter
    def src_batch_index(self, src_batch_index: int) -> None:
        # The setter checks the blocks-key rule before the range (reverse of the constructor).
        _check_blocks_key_batch_index(self._cache_key, src_batch_index)
        check_uint32("src_batch_index", src_batch_index)
        self._src_batch_index = src_batch_index

    def __repr__(self) -> str:
        return (f"TransferWithCacheKeyConfig(cache_key={self._cache_key}, "
                f"src_layer_range={self._src_layer_range}, "
                f"dst_layer_range={self._dst_layer_range}, "
                f"src_batch_index={self._src_batch_index})")


# -- CacheTask (§19) -------------------------------------------------------------------------


class CacheTask:
    """Handle of a running `transfer_cache_async`.

    Built by the cache manager: `done` is set when the task has finished, `results` maps a
    destination cluster id to its status and is filled by the task; results are read only
    once it has finished.
    """

    def __init__(self, done: threading.Event, transfer_configs,
                 results: Dict[int, Optional[LLMStatusCode]]):
        self._done = done
        self._transfer_configs = list(transfer_configs)
        self._results = results

    def _join(self, timeout_in_millis: Optional[int]) -> bool:
        """Wait for the task; True when it has finished."""
        timeout = None
        if timeout_in_millis is not None:
            check_uint32("timeout_in_millis", timeout_in_millis)
            timeout = timeout_in_millis / 1000
        return self._done.wait(timeout)

    def _per_config_results(self) -> List[Optional[LLMStatusCode]]:
        # Keyed by destination cluster: configs sharing one report the same value.
        return [self._results.get(config.dst_cluster_id) for config in self._transfer_configs]

    def synchronize(self, timeout_in_millis: Optional[int] = None) -> LLMStatusCode:
        """The first failing per-config result, `LLM_SUCCESS`, or `LLM_TIMEOUT` if still running."""
        if not self._join(timeout_in_millis):
            return LLMStatusCode.LLM_TIMEOUT
        for result in self._per_config_results():
            if result is not None and result != LLMStatusCode.LLM_SUCCESS:
                return result
        return LLMStatusCode.LLM_SUCCESS

    def get_results(self, timeout_in_millis: Optional[int] = None
                    ) -> List[Optional[LLMStatusCode]]:
        """One result per config (None: never reached); all `LLM_TIMEOUT` if still running."""
        if not self._join(timeout_in_millis):
            return [LLMStatusCode.LLM_TIMEOUT] * len(self._transfer_configs)
        return self._per_config_results()


# -- MemInfo (§20) and TensorDesc (§21.5) ----------------------------------------------------


class MemInfo:
    """A memory range for `remap_registered_memory` (ranges are checked there, not here)."""

    def __init__(self, mem_type: Memtype, addr: int, size: int):
        check_isinstance("mem_type", mem_type, Memtype)
        check_isinstance("addr", addr, int)
        check_isinstance("size", size, int)
        self._mem_type = mem_type
        self._addr = addr
        self._size = size

    @property
    def mem_type(self) -> Memtype:
        return self._mem_type

    @property
    def addr(self) -> int:
        return self._addr

    @property
    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"MemInfo(mem_type={self._mem_type}, addr={self._addr}, size={self._size})"

    __str__ = __repr__


class TensorDesc:
    """Minimal v1 tensor description: a data type and a shape."""

    def __init__(self, data_type: DataType, shape: Sequence[int]):
        check_isinstance("data_type", data_type, DataType)
        check_isinstance("shape", shape, [list, tuple], int)
        self._data_type = data_type
        self._shape = shape

    @property
    def data_type(self) -> DataType:
        return self._data_type

    @property
    def shape(self) -> Sequence[int]:
        return self._shape

    def __repr__(self) -> str:
        return f"TensorDesc(data_type={self._data_type}, shape={self._shape})"
