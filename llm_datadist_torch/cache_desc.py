"""`CacheDesc`: the shape, dtype and placement of the tensors of one cache (spec §9)."""
from __future__ import annotations

from typing import List, Tuple, Union

from ._checks import check_int32, check_isinstance, check_list_int64, check_uint32
from .data_type import DataType, itemsize
from .enums import Placement
from .status import raise_if_false

_INT64_MAX = 2**63 - 1
_MAX_DIMS = 31  # the engine accepts len(shape) < 32


def _tensor_bytes(shape, data_type) -> int:
    """`prod(shape) * itemsize`, or -1 when a dim is not a positive int or it overflows int64."""
    if not isinstance(data_type, DataType):
        # A None data_type passed construction; using it fails like upstream's `.value`.
        raise AttributeError(f"'{type(data_type).__name__}' object has no attribute 'value'")
    total = itemsize(data_type)
    for dim in shape:
        if not isinstance(dim, int) or dim <= 0:
            return -1
        total *= dim
        if total > _INT64_MAX:
            return -1
    return total


class CacheDesc:
    """Describes the `num_tensors` identically shaped tensors of one cache.

    Validation follows upstream's order exactly. `shape` is kept by reference, not copied.
    """

    def __init__(self,
                 num_tensors: int,
                 shape: Union[Tuple[int], List[int]],
                 data_type: DataType,
                 placement: Placement = Placement.DEVICE,
                 batch_dim_index: int = 0,
                 seq_len_dim_index: int = -1,
                 kv_tensor_format: str = None):
        check_uint32("num_tensors", num_tensors)
        check_isinstance("shape", shape, [tuple, list], int)
        check_isinstance("data_type", data_type, DataType)
        check_isinstance("placement", placement, Placement)
        check_isinstance("batch_dim_index", batch_dim_index, int)
        check_int32("seq_len_dim_index", seq_len_dim_index)
        check_isinstance("kv_tensor_format", kv_tensor_format, str)
        # A None shape or batch_dim_index that slipped through above fails here with TypeError.
        raise_if_false(0 <= batch_dim_index < len(shape),
                       "batch_dim_index %s out of range, [0, %s)", batch_dim_index, len(shape))
        raise_if_false(seq_len_dim_index == -1 or 0 <= seq_len_dim_index < len(shape),
                       "seq_len_dim_index %s is invalid, should be -1 or in range [0, %s)",
                       seq_len_dim_index, len(shape))
        check_list_int64("shape", shape)
        self._num_tensors = num_tensors
        self._shape = shape
        self._data_type = data_type
        self._placement = placement
        self._batch_dim = batch_dim_index
        self._batch_size = shape[batch_dim_index]
        self._seq_len_dim_index = seq_len_dim_index
        self._kv_tensor_format = kv_tensor_format
        self._size = -1  # lazily computed bytes of one tensor
        # Set on the caller's object by the *_blocks_* manager calls (spec §9.4, §26.10).
        self._is_blocks = False

    def __repr__(self) -> str:
        # Upstream omits the space before kv_tensor_format; kept verbatim.
        return (f"CacheDesc(num_tensors={self._num_tensors}, shape={self._shape}, "
                f"data_type={self._data_type}, placement={self._placement}, "
                f"batch_dim_index={self._batch_dim}, seq_len_dim_index={self._seq_len_dim_index},"
                f"kv_tensor_format={self._kv_tensor_format})")

    @property
    def num_tensors(self) -> int:
        return self._num_tensors

    @property
    def shape(self) -> Union[List[int], Tuple[int]]:
        return self._shape

    @property
    def data_type(self) -> DataType:
        return self._data_type

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def batch_dim(self) -> int:
        return self._batch_dim

    @property
    def batch_size(self) -> int:
        """`shape[batch_dim_index]` as it was at construction (not refreshed by `update_dim`)."""
        return self._batch_size

    @property
    def seq_len_dim_index(self) -> int:
        return self._seq_len_dim_index

    @property
    def kv_tensor_format(self) -> str:
        return self._kv_tensor_format

    @property
    def size(self) -> int:
        """Bytes of one tensor; `LLMException(PARAM)` for a non-positive dim or int64 overflow."""
        if self._size == -1:
            size = _tensor_bytes(self._shape, self._data_type)
            # Upstream leaves this status at LLM_SUCCESS; PARAM is the decision of §26.18.
            raise_if_false(size >= 0, "Failed to calc tensor size, shape = %s, data_type = %s",
                           self._shape, self._data_type)
            self._size = size
        return self._size

    def update_dim(self, dim_index: int, dim_value: int) -> None:
        """Set `shape[dim_index]` in place (no validation) and forget the cached size."""
        self._shape[dim_index] = dim_value
        self._size = -1

    def _dims_valid(self) -> bool:
        """Whether the engine would accept this geometry: 1..31 dims, all > 0, bytes fit int64.

        Raises `AttributeError` when `data_type` is None (as any upstream use of it does).
        """
        if not 1 <= len(self._shape) <= _MAX_DIMS:
            return False
        return _tensor_bytes(self._shape, self._data_type) >= 0
