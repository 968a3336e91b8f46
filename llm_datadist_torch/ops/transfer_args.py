"""Argument rules shared by the pull and push methods of both managers (spec §15.10-15.13, §15.20)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._checks import check_isinstance, check_uint32, check_uint64
from .remote_ref import RemoteRef
from ..keys import INVALID_ID, BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex
from ..status import raise_if_false
from ..transfer_types import check_strict_layer_range, pull_layer_ranges_to_tensor_indices


def tensor_num_per_layer(value) -> int:
    check_uint32("tensor_num_per_layer", value)
    raise_if_false(value > 0, "tensor_num_per_layer must be > 0")
    return value


def block_list(name: str, blocks) -> List[int]:
    """A list/tuple of block indices, or a 1-D integer torch tensor or numpy array of them (an
    engine's block table); negative ones are a `TypeError` like the native binding's.

    Checked with min/max over the whole list: block lists run to thousands of entries.
    """
    if blocks is None:
        raise TypeError(f"{name} only support list or tuple of int, but got None")
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 1 or blocks.dtype.is_floating_point or blocks.dtype.is_complex:
            raise TypeError(f"{name} as a tensor must be 1-D of an integer dtype, got "
                            f"{blocks.dim()}-D {blocks.dtype}")
        blocks = blocks.tolist()
    elif type(blocks).__module__ == "numpy" and hasattr(blocks, "tolist"):
        if getattr(blocks, "ndim", None) != 1 or blocks.dtype.kind not in "iub":
            raise TypeError(f"{name} as a numpy array must be 1-D of an integer dtype, got "
                            f"{getattr(blocks, 'ndim', '?')}-D {getattr(blocks, 'dtype', '?')}")
        blocks = blocks.tolist()
    if not isinstance(blocks, (list, tuple)) or not set(map(type, blocks)) <= {int, bool}:
        check_isinstance(name, blocks, (list, tuple), int)  # raises, naming the offender
    if blocks and min(blocks) < 0:
        raise TypeError(f"{name} only support non-negative int, but got {min(blocks)}")
    if blocks and max(blocks) >= 2**64:
        check_uint64(name, max(blocks))
    return list(blocks)


def check_request_key(key: CacheKey) -> None:
    """A pulled `CacheKey` names exactly one of a request id and a prefix id (§11.4)."""
    req_valid, prefix_valid = key.req_id != INVALID_ID, key.prefix_id != INVALID_ID
    raise_if_false(req_valid != prefix_valid,
                   "a CacheKey must set exactly one of req_id and prefix_id, got %r", key)


def pull_tensor_indices(kwargs: dict, local_num_tensors: int) -> Tuple[List[int], List[int]]:
    """Layer-range kwargs of a pull -> (source tensor indices, destination tensor indices)."""
    if not kwargs:  # every tensor: the usual call
        return [], []
    per_layer = tensor_num_per_layer(kwargs.get("tensor_num_per_layer", 2))
    src, dst = pull_layer_ranges_to_tensor_indices(kwargs.get("src_layer_range"),
                                                   kwargs.get("dst_layer_range"), per_layer)
    if src or dst:
        raise_if_false(local_num_tensors % per_layer == 0,
                       "%d cache tensors are not a whole number of %d-tensor layers",
                       local_num_tensors, per_layer)
        raise_if_false(all(i < local_num_tensors for i in dst),
                       "dst_layer_range goes past the %d tensors of the cache", local_num_tensors)
        if not dst:
            raise_if_false(len(src) == local_num_tensors,
                           "src_layer_range covers %d tensors, the cache has %d", len(src), local_num_tensors)
    return src, dst


def push_tensor_indices(src_layer_range: Optional[range], dst_layer_range: Optional[range],
                        per_layer, local_num_tensors: int) -> Tuple[List[int], List[int]]:
    """Strict layer ranges of a push (None = every layer) -> tensor indices."""
    per_layer = tensor_num_per_layer(per_layer)
    check_strict_layer_range(src_layer_range, "src_layer_range", allow_none=True)
    check_strict_layer_range(dst_layer_range, "dst_layer_range", allow_none=True)
    raise_if_false(local_num_tensors % per_layer == 0,
                   "%d cache tensors are not a whole number of %d-tensor layers", local_num_tensors, per_layer)
    layers = local_num_tensors // per_layer
    src_layers = src_layer_range if src_layer_range is not None else range(layers)
    dst_layers = dst_layer_range if dst_layer_range is not None else range(layers)
    raise_if_false(len(src_layers) == len(dst_layers), "src_layer_range and dst_layer_range differ "
                   "in length (%d / %d)", len(src_layers), len(dst_layers))
    raise_if_false(src_layers.stop <= layers, "src_layer_range %s past the %d layers of the cache",
                   src_layers, layers)

    def expand(layer_range):
        return [layer * per_layer + k for layer in layer_range for k in range(per_layer)]
    return expand(src_layers), expand(dst_layers)


def remote_ref(key) -> RemoteRef:
    if isinstance(key, BlocksCacheKey):
        return RemoteRef("blocks", model_id=key.model_id)
    if isinstance(key, CacheKeyByIdAndIndex):
        return RemoteRef("id_index", cache_id=key.cache_id, batch_index=key.batch_index)
    return RemoteRef("cache_key", req_id=key.req_id, prefix_id=key.prefix_id, model_id=key.model_id)
