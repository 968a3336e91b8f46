"""A paged KV cache as inference engines lay it out, and the block allocator that hands it out.

Per layer one K and one V tensor of shape [num_blocks, block_size, kv_heads, head_dim]; a
request owns a list of block ids (its block table) and token position p lives in block
table[p // block_size] at offset p % block_size. The 2*L tensors are what gets registered with
llm_datadist_torch (K0, V0, K1, V1, ...: one "layer" = 2 consecutive tensors, the library's
default tensor_num_per_layer).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import CacheDesc, DataType, Placement

_DATA_TYPES = {torch.float32: DataType.DT_FLOAT, torch.float16: DataType.DT_FLOAT16,
               torch.bfloat16: DataType.DT_BF16}


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockAllocator:
    """Free list of block ids. LIFO, so a freed block is the next one handed out and reuse
    happens as early as possible (a reused block still holds its last owner's bytes; positions
    past a request's length are never read, so that must not matter, and the demo checks it)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._ever_used = set()
        self.reused = 0          # allocations of a block that an earlier request had used
        self.peak_used = 0

    @property
    def free_count(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> Optional[List[int]]:
        """`count` block ids, or None when not enough are free (the caller waits and retries)."""
        if count > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(count)]
        self.reused += sum(block in self._ever_used for block in blocks)
        self._ever_used.update(blocks)
        self.peak_used = max(self.peak_used, self.num_blocks - len(self._free))
        return blocks

    def free(self, blocks: List[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        self.shape = [num_blocks, block_size, kv_heads, head_dim]
        self.block_size = block_size
        self.dtype = dtype
        # Separate tensors per layer and K/V, as engines allocate them; zeros so that the
        # memory is touched before it is registered and read by a peer.
        self.k = [torch.zeros(self.shape, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(self.shape, dtype=dtype) for _ in range(layers)]
        self.allocator = BlockAllocator(num_blocks)

    # ---- registration with llm_datadist_torch -------------------------------------------------
    def cache_desc(self) -> CacheDesc:
        return CacheDesc(2 * len(self.k), list(self.shape), _DATA_TYPES[self.dtype], Placement.DEVICE)

    def addrs(self) -> List[int]:
        """K0, V0, K1, V1, ...: the order vLLM-Ascend registers them in."""
        return [t.data_ptr() for pair in zip(self.k, self.v) for t in pair]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all 2*L tensors (what a pull of one block moves)."""
        return 2 * len(self.k) * self.k[0][0].numel() * self.k[0].element_size()

    # ---- what the model does with it -----------------------------------------------------------
    def slots(self, block_table: List[int], start: int, end: int) -> torch.Tensor:
        """Flat slot indices (block * block_size + offset) of positions start..end-1."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def _flat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(-1, *self.shape[2:])   # a view: writes land in the registered memory

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._flat(self.k[layer]).index_copy_(0, slots, k)
        self._flat(self.v[layer]).index_copy_(0, slots, v)

    def read(self, layer: int, slots: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return (self._flat(self.k[layer]).index_select(0, slots),
                self._flat(self.v[layer]).index_select(0, slots))

    def zero_block(self, block: int) -> None:
        """Test hook: destroy one block in every layer (a corrupted transfer)."""
        for tensor in self.k + self.v:
            tensor[block].zero_()
