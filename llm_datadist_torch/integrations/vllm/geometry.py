"""The KV geometry a peer must share with us before we pull its blocks, and the comparison.

A pull copies whole blocks byte for byte, so both engines must lay their KV caches out the same
way: same layers, tokens per block, tensors per layer and bytes per block, dtype, KV layout and
tensor-parallel split. The prefill side publishes its `Geometry` in the side-channel handshake;
the decoder compares it with its own before the first pull and refuses a peer that differs.
Weights are deliberately not part of it (a fine-tuned prefill model is a legitimate peer).
"""
from __future__ import annotations

from typing import List, Tuple

import msgspec

COMPARED = ("vllm_version", "architecture", "num_layers", "block_size", "dtype", "cache_dtype",
            "layout", "tensor_block_shapes", "tensor_block_bytes", "num_kv_heads", "head_size",
            "tp_size")


class Geometry(msgspec.Struct, frozen=True):
    """What one worker's registered KV cache looks like (and what produced it)."""

    vllm_version: str
    architecture: str
    num_layers: int
    block_size: int             # tokens per block
    dtype: str                  # torch dtype of the KV tensors
    cache_dtype: str            # vLLM's cache_dtype setting ("auto", "fp8", ...)
    layout: str                 # how the per-layer tensors were cut into block-major tensors
    tensor_block_shapes: List[List[int]]   # per registered tensor: the shape of one block
    tensor_block_bytes: List[int]          # per registered tensor: bytes of one block
    num_kv_heads: int
    head_size: int
    tp_size: int
    tp_rank: int

    @property
    def block_bytes(self) -> int:
        """Bytes one block occupies over every registered tensor (what one block pull moves)."""
        return sum(self.tensor_block_bytes)


class GeometryMismatch(RuntimeError):
    """A peer whose KV cache cannot be pulled into ours block for block."""


def differences(ours: Geometry, theirs: Geometry) -> List[Tuple[str, object, object]]:
    """(field, ours, theirs) for every compared field that differs."""
    return [(name, getattr(ours, name), getattr(theirs, name)) for name in COMPARED
            if getattr(ours, name) != getattr(theirs, name)]


def check_compatible(ours: Geometry, theirs: Geometry, peer: str) -> None:
    """Raise `GeometryMismatch` naming every difference, else return."""
    diffs = differences(ours, theirs)
    if diffs:
        text = "; ".join(f"{name}: ours {mine!r}, peer {other!r}" for name, mine, other in diffs)
        raise GeometryMismatch(f"LLMDataDistConnector refuses peer {peer}: its KV cache has "
                               f"another geometry ({text}); prefill and decode instances must "
                               f"run the same model architecture, dtype, block size, KV layout "
                               f"and tensor-parallel size")
