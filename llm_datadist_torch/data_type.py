"""`DataType` and its torch/numpy mappings (spec §4.4, §26.9).

The numpy tables of upstream (`dtype_to_np_dtype`, `valid_np_dtypes`, `np_dtype_to_dtype`) are
built on first access through the module `__getattr__`, so importing this module never imports
numpy.
"""
from __future__ import annotations

from enum import Enum

import torch

from .status import LLMStatusCode, LLMException


class DataType(Enum):
    """GE data types; values are the engine's `ge::DataType` numbers (5 is reserved there)."""

    # Declaration order is upstream's (it is the iteration order), not value order.
    DT_FLOAT = 0
    DT_FLOAT16 = 1
    DT_BF16 = 27
    DT_INT8 = 2
    DT_INT16 = 6
    DT_UINT16 = 7
    DT_UINT8 = 4
    DT_INT32 = 3
    DT_INT64 = 9
    DT_UINT32 = 8
    DT_UINT64 = 10
    DT_BOOL = 12
    DT_DOUBLE = 11
    DT_STRING = 13


_ITEMSIZES = {
    DataType.DT_FLOAT: 4, DataType.DT_FLOAT16: 2, DataType.DT_BF16: 2,
    DataType.DT_INT8: 1, DataType.DT_INT16: 2, DataType.DT_UINT16: 2, DataType.DT_UINT8: 1,
    DataType.DT_INT32: 4, DataType.DT_INT64: 8, DataType.DT_UINT32: 4, DataType.DT_UINT64: 8,
    DataType.DT_BOOL: 1, DataType.DT_DOUBLE: 8,
    DataType.DT_STRING: 16,  # the engine treats each element as two uint64
}

# Unsigned wide types exist from torch 2.3; older builds get the same-width signed dtype, which
# reinterprets the same bytes bit for bit.
_TO_TORCH = {
    DataType.DT_FLOAT: torch.float32,
    DataType.DT_FLOAT16: torch.float16,
    DataType.DT_BF16: torch.bfloat16,
    DataType.DT_INT8: torch.int8,
    DataType.DT_INT16: torch.int16,
    DataType.DT_UINT16: getattr(torch, "uint16", torch.int16),
    DataType.DT_UINT8: torch.uint8,
    DataType.DT_INT32: torch.int32,
    DataType.DT_INT64: torch.int64,
    DataType.DT_UINT32: getattr(torch, "uint32", torch.int32),
    DataType.DT_UINT64: getattr(torch, "uint64", torch.int64),
    DataType.DT_BOOL: torch.bool,
    DataType.DT_DOUBLE: torch.float64,
}

# Built from the unsigned entries only where torch really has them, so that a signed fallback
# never makes `torch.int16` map back to DT_UINT16.
_FROM_TORCH = {}
for _dt, _torch_dtype in _TO_TORCH.items():
    _FROM_TORCH.setdefault(_torch_dtype, _dt)
del _dt, _torch_dtype


def itemsize(dt: DataType) -> int:
    """Bytes of one element as the engine counts them (`DT_STRING` = 16)."""
    if not isinstance(dt, DataType):
        raise TypeError(f"data_type only support DataType, but got {type(dt).__name__}")
    return _ITEMSIZES[dt]


def to_torch_dtype(dt: DataType) -> torch.dtype:
    """The torch dtype holding `dt` elements.

    `DT_UINT16/32/64` map to `torch.uint16/32/64` when this torch has them, else to the signed
    dtype of the same width. `DT_STRING` has no torch equivalent: `LLMException(PARAM)`.
    """
    if not isinstance(dt, DataType):
        raise TypeError(f"data_type only support DataType, but got {type(dt).__name__}")
    if dt is DataType.DT_STRING:
        raise LLMException("DataType.DT_STRING has no torch dtype",
                           status_code=LLMStatusCode.LLM_PARAM_INVALID)
    return _TO_TORCH[dt]


def from_torch_dtype(torch_dtype: torch.dtype) -> DataType:
    """Inverse of `to_torch_dtype`: `TypeError` for a non-dtype, `ValueError` if unmapped."""
    if not isinstance(torch_dtype, torch.dtype):
        raise TypeError("torch_dtype only support torch.dtype, "
                        f"but got {type(torch_dtype).__name__}")
    try:
        return _FROM_TORCH[torch_dtype]
    except KeyError:
        raise ValueError(f"torch dtype {torch_dtype} has no DataType") from None


def _numpy_tables() -> dict:
    import numpy as np

    to_np = {
        DataType.DT_FLOAT: np.float32,
        DataType.DT_FLOAT16: np.float16,
        DataType.DT_BF16: np.float16,  # upstream's lossy quirk, kept for compatibility
        DataType.DT_INT8: np.int8,
        DataType.DT_INT16: np.int16,
        DataType.DT_UINT16: np.uint16,
        DataType.DT_UINT8: np.uint8,
        DataType.DT_INT32: np.int32,
        DataType.DT_INT64: np.int64,
        DataType.DT_UINT32: np.uint32,
        DataType.DT_UINT64: np.uint64,
        DataType.DT_BOOL: np.bool_,
        DataType.DT_DOUBLE: np.double,
        DataType.DT_STRING: np.bytes_,
    }
    # No BF16 entry: float16 must come back as DT_FLOAT16.
    from_np = {np.dtype(np_type): dt for dt, np_type in to_np.items() if dt is not DataType.DT_BF16}
    return {
        "dtype_to_np_dtype": to_np,
        "valid_np_dtypes": list(to_np.values()),
        "np_dtype_to_dtype": from_np,
    }


_LAZY_NUMPY_NAMES = ("dtype_to_np_dtype", "valid_np_dtypes", "np_dtype_to_dtype")


def __getattr__(name: str):
    if name in _LAZY_NUMPY_NAMES:
        tables = _numpy_tables()
        globals().update(tables)  # later lookups bypass this hook
        return tables[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
