"""Cache keys: `CacheKey`, `CacheKeyByIdAndIndex`, `BlocksCacheKey` (spec §11-13).

Equality is by value (§26.31) as a convenience only. The engine's key identity ignores
`cluster_id` (it only routes a request), so registries must key on `(req_id, model_id)` /
`(prefix_id, model_id)`, never on these objects.
"""
from __future__ import annotations

from ._checks import check_int64, check_uint32, check_uint64
from .status import raise_if_false

INVALID_ID = 2**64 - 1  # "unset" req_id / prefix_id

_CACHE_KEY_POSITIONAL = ("cluster_id", "req_id", "model_id", "prefix_id")
_CACHE_KEY_NAMES = frozenset(("prompt_cluster_id",) + _CACHE_KEY_POSITIONAL)
_BLOCKS_KEY_POSITIONAL = ("cluster_id", "model_id")
_BLOCKS_KEY_NAMES = frozenset(("prompt_cluster_id",) + _BLOCKS_KEY_POSITIONAL)


def _collect_params(args, kwargs, positional, valid_names, required) -> dict:
    """Upstream's parameter handling shared by the two keys with keyword aliases.

    Order of checks: count, then positional args overwrite same-named keywords, then the
    required names, then unknown keywords.
    """
    raise_if_false(len(args) + len(kwargs) <= len(positional), "Param num is over limit")
    params = dict(kwargs)
    params.update(zip(positional, args))
    raise_if_false("prompt_cluster_id" in params or "cluster_id" in params,
                   "Param prompt_cluster_id or cluster_id is required")
    for name in required:
        raise_if_false(name in params, "Param %s is required", name)
    for name in params:
        raise_if_false(name in valid_names, "Unsupported param:%s", name)
    return params


def _cluster_kwarg(params: dict) -> str:
    """Which spelling names the cluster; `cluster_id` wins when both are given."""
    return "cluster_id" if "cluster_id" in params else "prompt_cluster_id"


class _ValueEquality:
    """Value-based ==/hash over `_value()`: a convenience for users (spec §26.31).

    The cache registry never relies on it; it matches keys by engine identity (§11.3).
    """

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._value() == other._value()

    def __hash__(self):
        return hash((type(self).__name__, self._value()))


class CacheKey(_ValueEquality):
    """Names one batch slot of a contiguous cache by request id (or prefix id).

    ``CacheKey(cluster_id, req_id, model_id=0, prefix_id=2**64-1)``; `prompt_cluster_id` is a
    keyword alias of `cluster_id`.
    """

    def __init__(self, *args, **kwargs):
        params = _collect_params(args, kwargs, _CACHE_KEY_POSITIONAL, _CACHE_KEY_NAMES,
                                 required=("req_id",))
        self._cluster_id = params[_cluster_kwarg(params)]
        self._req_id = params["req_id"]
        self._model_id = params.get("model_id", 0)
        self._prefix_id = params.get("prefix_id", INVALID_ID)
        check_uint64("cluster_id", self._cluster_id)
        check_uint64("req_id", self._req_id)
        check_uint64("model_id", self._model_id)
        check_uint64("prefix_id", self._prefix_id)

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    @property
    def prompt_cluster_id(self) -> int:
        return self._cluster_id

    @property
    def req_id(self) -> int:
        return self._req_id

    @property
    def model_id(self) -> int:
        return self._model_id

    @property
    def prefix_id(self) -> int:
        return self._prefix_id

    def _value(self):
        return self._cluster_id, self._req_id, self._model_id, self._prefix_id


    def __repr__(self) -> str:
        return (f"CacheKey(cluster_id={self._cluster_id}, req_id={self._req_id}, "
                f"prefix_id={self._prefix_id}, model_id={self._model_id})")


class CacheKeyByIdAndIndex(_ValueEquality):
    """Addresses batch slot `batch_index` of the remote cache `cache_id` on `cluster_id`."""

    def __init__(self, cluster_id: int, cache_id: int, batch_index: int = 0):
        check_uint64("cluster_id", cluster_id)
        check_int64("cache_id", cache_id)
        check_uint32("batch_index", batch_index)
        self._cluster_id = cluster_id
        self._cache_id = cache_id
        self._batch_index = batch_index
        self._req_id = INVALID_ID

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    @property
    def cache_id(self) -> int:
        return self._cache_id

    @property
    def batch_index(self) -> int:
        return self._batch_index

    def _value(self):
        return self._cluster_id, self._cache_id, self._batch_index


    def __repr__(self) -> str:
        return (f"CacheKeyByIdAndIndex(cluster_id={self._cluster_id}, "
                f"cache_id={self._cache_id}, batch_index={self._batch_index})")


def _check_int_or_none(name: str, value, position: str) -> None:
    # BlocksCacheKey only type-checks (no range, None passes); ranges are checked where the
    # key is used (§26.21).
    if value is not None and not isinstance(value, int):
        raise TypeError(f"The {position} param {name} only support int, "
                        f"but got {type(value).__name__}")


class BlocksCacheKey(_ValueEquality):
    """Names a whole blocks (PagedAttention) cache: ``BlocksCacheKey(cluster_id, model_id=0)``."""

    def __init__(self, *args, **kwargs):
        params = _collect_params(args, kwargs, _BLOCKS_KEY_POSITIONAL, _BLOCKS_KEY_NAMES,
                                 required=())
        self._cluster_id_key = _cluster_kwarg(params)  # echoed by __repr__
        self._cluster_id = params[self._cluster_id_key]
        self._model_id = params.get("model_id", 0)
        _check_int_or_none("cluster_id", self._cluster_id, "first")
        _check_int_or_none("model_id", self._model_id, "second")

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    @property
    def prompt_cluster_id(self) -> int:
        return self._cluster_id

    @property
    def model_id(self) -> int:
        return self._model_id

    def _value(self):
        return self._cluster_id, self._model_id


    def __repr__(self) -> str:
        return (f"BlocksCacheKey({self._cluster_id_key}={self._cluster_id}, "
                f"model_id={self._model_id})")
