"""Argument checkers with the exact upstream semantics (spec §0.3).

Which exception a bad argument raises is part of the API: `TypeError` for a wrong type
(including `None`), `ValueError` for an integer out of range, and `LLMException` for the
remaining semantic checks (raised by callers through `status.raise_if_false`).
"""
from __future__ import annotations

from typing import Iterable

_RANGES = {
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


def _check_int(kind: str, name: str, value) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} only support int, but got {type(value).__name__}")
    low, high = _RANGES[kind]
    if not low <= value <= high:
        raise ValueError(f"{name} must be a {kind} in [{low}, {high}], but got {value}")


def check_uint8(name: str, value) -> None:
    _check_int("uint8", name, value)


def check_uint16(name: str, value) -> None:
    _check_int("uint16", name, value)


def check_int32(name: str, value) -> None:
    _check_int("int32", name, value)


def check_uint32(name: str, value) -> None:
    _check_int("uint32", name, value)


def check_int64(name: str, value) -> None:
    _check_int("int64", name, value)


def check_uint64(name: str, value) -> None:
    _check_int("uint64", name, value)


def _check_list(kind: str, name: str, values) -> None:
    if values is None or isinstance(values, (str, bytes)):
        raise TypeError(f"{name} only support a list of int, but got {type(values).__name__}")
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{name} only support a list of int, but got {type(values).__name__}") from None
    for index, item in enumerate(items):
        _check_int(kind, f"{name}[{index}]", item)


def check_list_int64(name: str, values: Iterable[int]) -> None:
    _check_list("int64", name, values)


def check_list_uint64(name: str, values: Iterable[int]) -> None:
    _check_list("uint64", name, values)


def check_isinstance(name: str, value, classes, inner_class=None, allow_none: bool = True) -> None:
    """Upstream `check_isinstance`: `None` passes silently when `allow_none` (the default)."""
    if value is None and allow_none:
        return
    if not isinstance(classes, (list, tuple)):
        classes = (classes,)
    if not isinstance(value, tuple(classes)):
        expected = ", ".join(cls.__name__ for cls in classes)
        raise TypeError(f"{name} only support {expected}, but got {type(value).__name__}")
    if inner_class is not None:
        inner = tuple(inner_class) if isinstance(inner_class, (list, tuple)) else (inner_class,)
        for item in value:
            if not isinstance(item, inner):
                expected = ", ".join(cls.__name__ for cls in inner)
                raise TypeError(f"elements of {name} only support {expected}, "
                                f"but got {type(item).__name__}")
