"""The dense (Qwen2 / Llama, i.e. the DeepSeek-R1-Distill models) forward on a paged per-KV-head cache.

Same interface and packed layout as `runner.Runner` (the MLA one): the engine hands over a `Batch`
from `make_batch`, linear layers and norms run on the packed new tokens [N, h], and only attention
regroups queries per sequence. The cache holds the rotated keys and the values of every KV head,
kv[layer, block, slot] = [k | v] of shape [2, n_kv_heads, head_dim] (see cache.py).

GQA without expanding K/V: query head h reads KV head h // group (transformers' `repeat_kv` order), so
viewing the queries as [B, n_kv_heads, T * group, head_dim] turns attention into one batched matmul
per KV head against its own keys — the cached keys are never copied `group` times.
"""

from __future__ import annotations

import math

import torch

from seekling.engine.runner import Batch
from seekling.model.dense import Attention, DenseModel, rotate_half


class DenseRunner:
    def __init__(self, model: DenseModel, kv: torch.Tensor, block_size: int):
        self.model, self.kv, self.block_size = model, kv, block_size
        self.config = model.config

    def attention(self, attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                  batch: Batch, bias: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        g = H // Hkv
        q = attn.q_proj(x).view(N, H, D)
        k = attn.k_proj(x).view(N, Hkv, D)
        v = attn.v_proj(x).view(N, Hkv, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache = self.kv[layer]  # [num_blocks, block_size, 2, Hkv, D]
        # index_copy_ / index_select rather than tensor indexing: the same, several times cheaper on CPU
        cache.view(-1, 2, Hkv, D).index_copy_(0, batch.slots, torch.stack([k, v], dim=1).to(cache.dtype))
        B = batch.block_tables.shape[0]
        q = q.view(B, -1, H, D) if batch.q_index is None else q[batch.q_index]  # [B, T, H, D]
        T = q.shape[1]
        q = q.view(B, T, Hkv, g, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T * g, D)
        kv = cache.index_select(0, batch.block_tables.view(-1)).view(B, -1, 2, Hkv, D)  # [B, L, 2, Hkv, D]
        keys, values = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [B, Hkv, L, D]
        scores = torch.matmul(q, keys.transpose(2, 3)).view(B, Hkv, T, g, -1) * (1 / math.sqrt(D))
        # softmax in fp32 (as transformers' eager/SDPA paths do) so bf16 weights keep the same ranking
        p = (scores + bias).float().softmax(-1).to(values.dtype)
        o = torch.matmul(p.view(B, Hkv, T * g, -1), values)  # [B, Hkv, T * g, D]
        o = o.view(B, Hkv, T, g, D).permute(0, 2, 1, 3, 4).reshape(B * T, H * D)
        o = o if batch.unpad is None else o[batch.unpad]
        return attn.o_proj(o)

    def forward(self, batch: Batch) -> torch.Tensor:
        """The decoder over the batch's new tokens; writes their K/V; returns the final normed hidden
        states [N, h] (lm_head of a row gives its next-token logits)."""
        body = self.model.model
        x = body.embed_tokens(batch.input_ids)
        # RoPE angles in fp32, cos/sin in the model dtype: the same rounding as DenseBody / transformers
        freqs = batch.positions[:, None].float() * body.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [N, 1, D]: broadcast over heads
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        bias = batch.bias.permute(0, 2, 1, 3).unsqueeze(3).to(x.dtype)  # [B, 1, Tmax, 1, L]: over KV heads and groups
        for i, layer in enumerate(body.layers):
            x = x + self.attention(layer.self_attn, layer.input_layernorm(x), cos, sin, i, batch, bias)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return body.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h)
