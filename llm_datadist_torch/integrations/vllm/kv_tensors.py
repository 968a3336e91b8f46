"""vLLM's per-layer KV tensors as block-major tensors that `register_blocks_cache` accepts.

`register_blocks_cache` wants tensors whose dimension 0 is the block index, each one
contiguous range of memory. vLLM hands the connector one tensor per layer, laid out by the
attention backend:

* `[num_blocks, ...]`, contiguous (CPU attention: K and V packed per block): one tensor;
* `[2, num_blocks, ...]` (K and V first, e.g. FlashAttention): two tensors, K and V;
* layers interleaved in one buffer with the block outermost (cross-layer layouts): the whole
  buffer as one tensor, a block being every layer's slice of it.

Each becomes a `uint8` view `[num_blocks, block_bytes]` of the same memory (a pull moves
bytes; the dtype and shapes go into the `Geometry` that peers compare). Views of equal
`block_bytes` are registered together, as one cache (`group_by_block_bytes`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch


@dataclass
class BlockTensors:
    tensors: List[torch.Tensor]        # uint8 [num_blocks, block_bytes], vLLM's memory
    block_shapes: List[List[int]]      # the typed shape of one block of each
    layout: str                        # "blocks_first", "kv_first" or "cross_layer"


def _as_blocks(tensor: torch.Tensor, num_blocks: int) -> torch.Tensor:
    return tensor.view(torch.uint8).reshape(num_blocks, -1) if tensor.dim() else tensor


def split_kv_caches(kv_caches: Dict[str, torch.Tensor], num_blocks: int) -> BlockTensors:
    """The block-major byte views of vLLM's KV tensors, layer by layer in model order."""
    if not kv_caches:
        raise ValueError("LLMDataDistConnector: vLLM registered no KV cache tensors")
    layers = list(kv_caches.values())
    if all(t.shape[0] == num_blocks and t.is_contiguous() for t in layers):
        return BlockTensors([_as_blocks(t, num_blocks) for t in layers],
                            [list(t.shape[1:]) for t in layers], "blocks_first")
    if all(t.dim() >= 2 and t.shape[0] == 2 and t.shape[1] == num_blocks
           and t[0].is_contiguous() and t[1].is_contiguous() for t in layers):
        return BlockTensors([_as_blocks(t[i], num_blocks) for t in layers for i in (0, 1)],
                            [list(t.shape[2:]) for t in layers for _ in (0, 1)], "kv_first")
    shared = _cross_layer_buffer(layers, num_blocks)
    if shared is not None:
        return BlockTensors([shared], [[shared.shape[1]]], "cross_layer")
    shapes = {name: (tuple(t.shape), t.stride()) for name, t in kv_caches.items()}
    raise NotImplementedError(f"LLMDataDistConnector: unsupported KV cache layout for "
                              f"{num_blocks} blocks (shape, stride per layer): {shapes}")


def _cross_layer_buffer(layers: List[torch.Tensor], num_blocks: int):
    """One uint8 [num_blocks, stride] view of a buffer every layer lives in, block outermost."""
    storage = layers[0].untyped_storage()
    strides = set()
    for tensor in layers:
        if tensor.untyped_storage().data_ptr() != storage.data_ptr():
            return None
        dims = [d for d, size in enumerate(tensor.shape) if size == num_blocks]
        if len(dims) != 1:
            return None
        strides.add(tensor.stride(dims[0]) * tensor.element_size())
    if len(strides) != 1:
        return None
    stride = strides.pop()
    if stride * num_blocks != storage.nbytes():
        return None
    view = torch.empty(0, dtype=torch.uint8, device=layers[0].device)
    return view.set_(storage, 0, (num_blocks, stride), (stride, 1))


def group_by_block_bytes(tensors: List[torch.Tensor]) -> List[Tuple[int, List[torch.Tensor]]]:
    """[(block_bytes, tensors)] in first-seen order: each group is one registered cache."""
    groups: Dict[int, List[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.shape[1], []).append(tensor)
    return list(groups.items())
