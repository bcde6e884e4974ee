"""The paged KV cache: a pool of fixed-size blocks, and the block manager that hands them out.

The cache is one tensor kv[layer, block, slot, *entry], the entry being what the model family keeps per
token and layer (`model.cache_entry_shape()`, the engine allocates it):
  - MLA needs only two things (DeepSeek-V2 §2.1.3): the compressed latent c_KV (kv_lora_rank wide, after
    kv_a_layernorm) and the shared RoPE key k_pe (qk_rope_head_dim wide, already rotated), side by side:
    entry [kv_lora_rank + d_rope], so a token costs L × (kv_lora_rank + qk_rope_head_dim) × dtype bytes,
    against L × n_heads × (qk_head_dim + v_head_dim) × dtype for expanded K/V. The MTP module, when
    speculative decoding uses it, is one more cache layer at the end.
  - Dense GQA models (the Qwen2/Llama R1 distills) keep the rotated keys and values per KV head:
    entry [2, n_kv_heads, head_dim].
The block id is dim 1 in every layout, so forks copy blocks alike.

A sequence owns a block table (list of block ids); position p lives in slot p % block_size of block
table[p // block_size]. Blocks are reference counted so n samples of one prompt share its full blocks,
and full blocks are remembered by content (prefix caching) after their sequence is gone.
"""

from __future__ import annotations

import math

import torch


class BlockManager:
    """Hands out blocks; reference counts let several sequences share one.

    Prefix caching: a full block is registered under a hash of its tokens chained with its prefix's
    hash. A freed block keeps its contents and registration until it is handed out again (free
    blocks are reused least recently freed first), so a new request, or a preempted one coming back,
    picks up the blocks of a prefix that was computed before.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the cache needs at least one block of at least one slot "
                             f"(num_blocks={num_blocks}, block_size={block_size})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered: oldest first
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks  # to rule out hash collisions
        self.by_hash: dict[int, int] = {}
        self.num_prefix_hits = 0  # tokens whose latent came from the prefix cache

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, table: list[int], num_tokens: int, extra: int = 0) -> bool:
        """Whether `table` can be extended to hold num_tokens positions (plus `extra` spare blocks)."""
        return self.blocks_for(num_tokens) - len(table) + extra <= self.num_free

    def _take(self) -> int:
        b = next(iter(self.free))
        del self.free[b]
        if self.hash_of[b] is not None:  # its cached prefix is overwritten from now on
            if self.by_hash.get(self.hash_of[b]) == b:
                del self.by_hash[self.hash_of[b]]
            self.hash_of[b] = self.tokens_of[b] = None
        self.ref[b] = 1
        return b

    def grow(self, table: list[int], num_tokens: int) -> None:
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            raise RuntimeError(f"out of cache blocks: need {need}, {self.num_free} free")
        table.extend(self._take() for _ in range(need))

    def release(self, table: list[int]) -> None:
        for b in table:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
        table.clear()

    def match_prefix(self, tokens: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """The cached blocks holding the longest prefix of `tokens` (at most max_tokens of them), taken
        for the caller, and their chain hashes."""
        table: list[int] = []
        hashes: list[int] = []
        bs = self.block_size
        for i in range(max_tokens // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = hash((hashes[-1] if hashes else None, chunk))
            b = self.by_hash.get(h)
            if b is None or self.tokens_of[b] != chunk:
                break
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
            table.append(b)
            hashes.append(h)
        self.num_prefix_hits += len(table) * bs
        return table, hashes

    def register(self, table: list[int], hashes: list[int], tokens: list[int], num_tokens: int) -> None:
        """Register the blocks of `table` that the first num_tokens positions fill completely."""
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = hash((hashes[-1] if hashes else None, chunk))
            hashes.append(h)
            b = table[i]
            if h not in self.by_hash and self.hash_of[b] is None:
                self.by_hash[h] = b
                self.hash_of[b], self.tokens_of[b] = h, chunk

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
            new = self._take()
            kv[:, new] = kv[:, b]
            child.append(new)
        return child


def allocate(model: torch.nn.Module, speculative: bool, max_num_seqs: int, block_size: int, cache_blocks: int | None,
             cache_memory: int, device: torch.device) -> torch.Tensor:
    """The cache kv[layer, block, slot, *entry] for `model` (its main layers, plus the MTP module's when it drafts),
    in the activations' dtype (int8 weights compute in fp32). Without `cache_blocks`: enough for every sequence
    at full length, within `cache_memory` bytes."""
    dtype = model.model.norm.weight.dtype
    layers, entry = model.num_cache_layers(speculative), model.cache_entry_shape()
    per_token = layers * math.prod(entry) * dtype.itemsize
    if cache_blocks is None:
        want = max_num_seqs * -(-model.config.max_position_embeddings // block_size)
        cache_blocks = max(1, min(want, cache_memory // (per_token * block_size)))
    return torch.zeros(layers, cache_blocks, block_size, *entry, dtype=dtype, device=device)
