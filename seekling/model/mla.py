"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1) and its (YaRN) RoPE.

Symbols follow the paper: the keys and values of a token are compressed jointly into a latent
c_KV (kv_lora_rank wide) plus one RoPE key k_pe (qk_rope_head_dim wide) shared by all heads; only
those two need caching. Queries are optionally compressed to q_lora_rank first. Parameter names
are the Hugging Face `DeepseekV3Attention` names so checkpoints load by name.

Two forwards over the same weights (as DeepSeek's inference/model.py has its "naive" and "absorb" modes):
- `forward` (training, full sequences): up-project the latent to per-head keys and values (naive);
- `infer` (the engine's step, on the paged latent cache): the absorbed form. With kv_b_proj split per head
  into W_UK (keys) and W_UV (values),
      q_nope · k_nope = q_nope · (W_UK c_KV) = (W_UK^T q_nope) · c_KV
      o = Σ p · (W_UV c_KV) = W_UV (Σ p · c_KV)
  so queries move into the latent space and attention reads the cached [c_KV | k_pe] directly: one key
  "head" of kv_lora_rank + qk_rope_head_dim shared by all heads, never expanded. W_UK and W_UV are applied
  at run time (two small per-head matmuls), as DeepSeek and vLLM do, rather than multiplied into the query
  and output projections: that would be a second copy of those weights.
`prepare` builds what `infer` reads: the query and latent projections fused into one matmul whose storage
the parameters themselves then live in (fp32 / bf16: one copy), or int8 copies (`quantize="int8"`, after
which the model is for inference only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekling.model.config import ModelConfig
from seekling.model.layers import (
    Batch,
    RMSNorm,
    alias,
    apply_rope,
    attend,
    fuse_parameters,
    gather_cache,
    per_sequence,
    rope_frequencies,
)
from seekling.model.quant import Int8Weight, linear, quantize


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """The decoupled RoPE's frequencies (qk_rope_head_dim wide) and cos/sin factor: `layers.rope_frequencies`.
    YaRN's mscale_all_dim part goes into the softmax scale instead (config.softmax_scale)."""
    return rope_frequencies(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [..., T] -> cos, sin [..., T, 1, d/2] (fp32; the 1 broadcasts over heads)."""
        freqs = position_ids[..., None, None].float() * self.inv_freq
        if self.attention_factor == 1.0:
            return freqs.cos(), freqs.sin()
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # its layer of the engine's latent cache
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = config.softmax_scale
        h = config.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, h, bias=False)
        # What `infer` reads, built by `prepare`: [q | c_KV | k_pe] (q_a in place of q with q_lora) from x.
        self.w_in: torch.Tensor | Int8Weight | None = None
        self.w_q_b: torch.Tensor | Int8Weight | None = None
        self.w_o: torch.Tensor | Int8Weight | None = None

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B,T,H,d_nope] and the rotated q_pe [B,T,H,d_rope]."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, interleaved=True)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a token leaves in the KV cache: c_KV [B,T,kv_lora_rank] and the rotated k_pe [B,T,d_rope]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, interleaved=True).squeeze(2)
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Naive (non-absorbed) MLA for training and prefill: up-project the latent to per-head K, V."""
        B, T, _ = x.shape
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        # SDPA's fused (flash) CPU kernel needs equal q/k and v head dims, else it falls back to the
        # math path (materialised [T, T] scores and mask). Zero-padding v to the q/k width gives
        # the same output in its first v_head_dim columns, and the fused kernel skips the masked half.
        pad = self.qk_head_dim - self.v_head_dim
        v = F.pad(v, (0, pad)) if pad > 0 else v
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=attn_mask,
                                           is_causal=attn_mask is None, scale=self.softmax_scale)
        o = o[..., :self.v_head_dim] if pad > 0 else o
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))

    # --- inference --------------------------------------------------------------------------------------
    def input_projections(self) -> list[nn.Parameter]:
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        return [first.weight, self.kv_a_proj_with_mqa.weight]

    def prepare(self, quantize_to: str | None = None) -> list[nn.Parameter]:
        """Build the weights `infer` reads; returns the parameters an int8 copy replaced (the caller frees
        them). fp32/bf16: the input projections become views of one fused tensor (no copy)."""
        sources = self.input_projections()
        if quantize_to is None:
            self.w_in = fuse_parameters(sources, self)
            self.w_q_b = None if self.q_lora_rank is None else alias(self.q_b_proj.weight, self)
            self.w_o = alias(self.o_proj.weight, self)
            return []
        self.w_in = quantize(sources, quantize_to)
        self.w_o = quantize(self.o_proj.weight, quantize_to)
        replaced = sources + [self.o_proj.weight]
        if self.q_lora_rank is not None:
            self.w_q_b = quantize(self.q_b_proj.weight, quantize_to)
            replaced.append(self.q_b_proj.weight)
        return replaced

    def infer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Absorbed MLA over the packed rows x [N, h] (normalised) on the latent cache.
        -> (output [N, h], or [B, h] at each sequence's last row for a last_only batch; the new latents
        [c_KV | k_pe] [N, kv_lora_rank + qk_rope_head_dim] for the cache)."""
        H, r, dn, dr = self.n_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim
        N = x.shape[0]
        y = linear(x, self.w_in)
        if self.q_lora_rank is None:
            q, c_kv, k_pe = y.split([H * (dn + dr), r, dr], dim=-1)
        else:
            q_a, c_kv, k_pe = y.split([self.q_lora_rank, r, dr], dim=-1)
            q = linear(self.q_a_layernorm(q_a), self.w_q_b)
        q_nope, q_pe = q.view(N, H, dn + dr).split([dn, dr], dim=-1)
        pe = apply_rope(torch.cat([q_pe, k_pe.view(N, 1, dr)], dim=1), cos, sin, interleaved=True)  # one rotation
        latent = torch.cat([self.kv_a_layernorm(c_kv), pe[:, H]], dim=-1)  # what the cache keeps
        w_kv = self.kv_b_proj.weight.view(H, dn + self.v_head_dim, r)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_kv[:, :dn]).transpose(0, 1)  # W_UK^T q_nope: [N, H, r]
        q = torch.cat([q_lat, pe[:, :H]], dim=-1)  # [N, H, r + dr]
        if batch.keep is not None:
            q = q.index_select(0, batch.keep)
        keys = torch.cat([gather_cache(batch, self.layer_idx), per_sequence(latent, batch)], dim=1)
        keys = keys.unsqueeze(2)  # [B, S, 1, r + dr]: the one key head every query head reads
        o = attend(q, keys, keys[..., :r], batch, self.softmax_scale)  # [rows, H, r] in the latent space
        o = torch.bmm(o.transpose(0, 1), w_kv[:, dn:].transpose(1, 2)).transpose(0, 1)  # W_UV: [rows, H, dv]
        return linear(o.flatten(1), self.w_o), latent
