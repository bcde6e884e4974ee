"""The latent KV cache: a pool of fixed-size blocks, and the block manager that hands them out.

MLA needs only two things per token and layer (DeepSeek-V2 §2.1.3): the compressed latent c_KV
(kv_lora_rank wide, after kv_a_layernorm) and the shared RoPE key k_pe (qk_rope_head_dim wide,
already rotated). They are stored side by side in one tensor
    kv[layer, block, slot] = [c_KV | k_pe]      shape [L, num_blocks, block_size, kv_lora_rank + d_rope]
so a token costs L × (kv_lora_rank + qk_rope_head_dim) × dtype bytes, against
L × n_heads × (qk_head_dim + v_head_dim) × dtype for expanded K/V. The MTP module, when speculative
decoding uses it, is one more cache layer at the end.

A sequence owns a block table (list of block ids); position p lives in slot p % block_size of block
table[p // block_size]. Blocks are reference counted so n samples of one prompt share its full blocks.
"""

from __future__ import annotations

import torch


def cache_bytes_per_token(num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int,
                          dtype: torch.dtype) -> int:
    return num_layers * (kv_lora_rank + qk_rope_head_dim) * torch.empty((), dtype=dtype).element_size()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the cache needs at least one block of at least one slot "
                             f"(num_blocks={num_blocks}, block_size={block_size})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives low ids first
        self.ref = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, table: list[int], num_tokens: int, extra: int = 0) -> bool:
        """Whether `table` can be extended to hold num_tokens positions (plus `extra` spare blocks)."""
        return self.blocks_for(num_tokens) - len(table) + extra <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            raise RuntimeError(f"out of cache blocks: need {need}, {self.num_free} free")
        for _ in range(need):
            b = self.free.pop()
            self.ref[b] = 1
            table.append(b)

    def release(self, table: list[int]) -> None:
        for b in table:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)
        table.clear()

    def fork(self, table: list[int], num_tokens: int, shared_tokens: int,
             kv: torch.Tensor) -> list[int] | None:
        """A child's block table for the first num_tokens positions of `table`: the blocks wholly below
        shared_tokens are shared, the rest copied (the child writes its own tokens there). None when
        there are not enough free blocks for the copies."""
        full = shared_tokens // self.block_size
        copies = table[full:self.blocks_for(num_tokens)]
        if len(copies) > self.num_free:
            return None
        child = list(table[:full])
        for b in child:
            self.ref[b] += 1
        for b in copies:
            new = self.free.pop()
            self.ref[new] = 1
            kv[:, new] = kv[:, b]
            child.append(new)
        return child


def allocate_kv(num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int, qk_rope_head_dim: int,
                dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    return torch.zeros(num_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim, dtype=dtype,
                       device=device)
