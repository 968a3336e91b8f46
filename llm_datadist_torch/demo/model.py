"""A tiny decoder-only transformer (RMSNorm, rotary positions, SiLU MLP) over a paged KV cache.

Weights are random from a fixed seed, so every process that builds `TinyDecoder(config)` holds
the same bits. One `forward` serves prefill (many tokens) and decode (one token): it writes the
new K/V into the paged cache and reads attention's K/V back *from the cache*, so a decoder that
pulled the cache computes exactly what the process that wrote it would have computed.

Everything runs in float32 on one CPU thread per process: same shapes, same kernels, same bits
(no reduced-precision rounding or thread-count-dependent reduction order to worry about).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence

import torch

from .paged_cache import PagedKVCache

DTYPE = torch.float32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int = 2048
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4            # grouped-query attention: heads share K/V heads
    head_dim: int = 64
    mlp_mult: int = 4
    block_size: int = 16
    max_positions: int = 8192
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab", "layers", "heads", "kv_heads", "head_dim", "mlp_mult", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.heads % self.kv_heads:
            raise ValueError("heads must be a multiple of kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (rotary embedding)")

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


class TinyDecoder:
    """Plain tensors instead of nn.Module: inference only, and the weights are easy to see."""

    def __init__(self, config: ModelConfig):
        self.config = c = config
        gen = torch.Generator().manual_seed(c.seed)

        def weight(rows: int, cols: int) -> torch.Tensor:
            # 1/sqrt(fan_in) keeps activations O(1) through the layers, so logits stay spread
            # out and greedy tokens depend on the whole context (a good exactness probe).
            return torch.randn(rows, cols, generator=gen, dtype=DTYPE) / math.sqrt(cols)

        kv = c.kv_heads * c.head_dim
        self.embed = torch.randn(c.vocab, c.hidden, generator=gen, dtype=DTYPE)
        self.layers = [dict(attn_norm=torch.ones(c.hidden, dtype=DTYPE),
                            wqkv=weight(c.hidden + 2 * kv, c.hidden),
                            wo=weight(c.hidden, c.hidden),
                            mlp_norm=torch.ones(c.hidden, dtype=DTYPE),
                            w_up=weight(c.mlp_mult * c.hidden, c.hidden),
                            w_down=weight(c.hidden, c.mlp_mult * c.hidden))
                       for _ in range(c.layers)]
        self.final_norm = torch.ones(c.hidden, dtype=DTYPE)
        self.lm_head = weight(c.vocab, c.hidden)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        angles = torch.outer(torch.arange(c.max_positions, dtype=torch.float64), inv_freq)
        self.cos, self.sin = angles.cos().to(DTYPE), angles.sin().to(DTYPE)

    # ---- building blocks ---------------------------------------------------------------------
    @staticmethod
    def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; rotate (even, odd) pairs by the position's angles."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """q: [T, H, D] for positions start..start+T-1; k, v: [start+T, KVH, D] from the cache."""
        c = self.config
        group = c.heads // c.kv_heads
        q = q.transpose(0, 1)                                     # [H, T, D]
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)     # [H, S, D]
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(c.head_dim)   # [H, T, S]
        t, s = q.shape[1], k.shape[1]
        # query i (absolute position start+i) sees keys 0..start+i
        causal = torch.arange(s).unsqueeze(0) > (torch.arange(t).unsqueeze(1) + start)
        scores = scores.masked_fill(causal, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)    # [H, T, D]
        return out.transpose(0, 1).reshape(t, c.hidden)

    # ---- the model ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], start: int, cache: PagedKVCache,
                block_table: List[int]) -> torch.Tensor:
        """Run `tokens` at positions start.. ; K/V go to the cache slots of `block_table`.

        Returns the logits of the last token ([vocab], float32)."""
        c = self.config
        kv = c.kv_heads * c.head_dim
        positions = torch.arange(start, start + len(tokens))
        end = start + len(tokens)
        write_slots = cache.slots(block_table, start, end)
        read_slots = cache.slots(block_table, 0, end)
        x = self.embed[torch.tensor(tokens)]
        for index, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer["attn_norm"])
            qkv = torch.matmul(h, layer["wqkv"].t())
            q = qkv[:, :c.hidden].reshape(-1, c.heads, c.head_dim)
            k = qkv[:, c.hidden:c.hidden + kv].reshape(-1, c.kv_heads, c.head_dim)
            v = qkv[:, c.hidden + kv:].reshape(-1, c.kv_heads, c.head_dim)
            q, k = self._rotary(q, positions), self._rotary(k, positions)
            cache.write(index, write_slots, k, v)
            k_all, v_all = cache.read(index, read_slots)
            x = x + torch.matmul(self._attention(q, k_all, v_all, start), layer["wo"].t())
            h = self._rms_norm(x, layer["mlp_norm"])
            up = torch.nn.functional.silu(torch.matmul(h, layer["w_up"].t()))
            x = x + torch.matmul(up, layer["w_down"].t())
        last = self._rms_norm(x[-1:], self.final_norm)
        return torch.matmul(last, self.lm_head.t())[0]


def greedy(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))


def logits_bytes(logits: torch.Tensor) -> bytes:
    """The raw float32 bits, for digests that prove two runs computed the same thing."""
    return logits.contiguous().numpy().tobytes()
