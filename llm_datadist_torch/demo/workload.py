"""What the demo runs: its settings, the prompts, and the cache sizes derived from them."""
from __future__ import annotations

import dataclasses
from typing import List

import torch

from .. import LLMConfig
from .model import ModelConfig
from .paged_cache import blocks_for

PREFILL_CLUSTER_ID = 1001
DECODE_CLUSTER_ID = 2001
MODEL_ID = 0


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    model: ModelConfig = ModelConfig()
    requests: int = 8
    prompt_len: int = 256          # the longest prompt; the others are shorter (down to half)
    new_tokens: int = 32           # tokens decode generates after prefill's first token
    max_batch: int = 4             # requests decode runs at once (round-robin)
    prefill_capacity: int = 2      # requests prefill's cache holds: the rest must reuse blocks
    layer_chunk: int = 0           # layers per pull_blocks call; 0 = half of them (2 calls)
    timeout_s: float = 300.0
    corrupt_block: bool = False    # test hook: decode zeroes one pulled block

    def __post_init__(self):
        if self.requests < 1 or self.new_tokens < 1 or self.max_batch < 1 or self.prefill_capacity < 1:
            raise ValueError("requests, new-tokens, max-batch and prefill-capacity must be >= 1")
        if self.layer_chunk < 0:
            raise ValueError("layer-chunk must be >= 0")
        if self.prompt_len < 2:
            raise ValueError("prompt-len must be >= 2")
        if self.prompt_len + self.new_tokens > self.model.max_positions:
            raise ValueError(f"prompt-len + new-tokens must be <= {self.model.max_positions}")

    @property
    def layer_ranges(self) -> List[range]:
        layers = self.model.layers
        chunk = self.layer_chunk or max(1, -(-layers // 2))
        return [range(start, min(start + chunk, layers)) for start in range(0, layers, chunk)]

    @property
    def prefill_blocks(self) -> int:
        return self.prefill_capacity * blocks_for(self.prompt_len, self.model.block_size)

    @property
    def decode_blocks(self) -> int:
        return self.max_batch * blocks_for(self.prompt_len + self.new_tokens, self.model.block_size)


def make_prompts(config: DemoConfig) -> List[List[int]]:
    """Random token ids; lengths spread over [prompt_len/2, prompt_len], so they differ, and
    most span several blocks with a partly filled last one."""
    gen = torch.Generator().manual_seed(config.model.seed + 1)
    low = max(1, config.prompt_len // 2)
    prompts = []
    for index in range(config.requests):
        length = config.prompt_len if index == 0 else int(torch.randint(low, config.prompt_len + 1, (1,),
                                                                        generator=gen))
        prompts.append(torch.randint(0, config.model.vocab, (length,), generator=gen).tolist())
    return prompts


def datadist_options(sync_kv_timeout_ms: int, listen: str = "") -> dict:
    """v2 (cache manager) options, as vLLM-Ascend sets them; no pools: engines register their
    own tensors."""
    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    config.sync_kv_timeout = sync_kv_timeout_ms
    if listen:
        config.listen_ip_info = listen
    return config.generate_options()
