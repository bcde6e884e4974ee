"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1), with RMSNorm and (YaRN) RoPE.

Symbols follow the paper: the keys and values of a token are compressed jointly into a latent
c_KV (kv_lora_rank wide) plus one RoPE key k_pe (qk_rope_head_dim wide) shared by all heads; only
those two need caching. Queries are optionally compressed to q_lora_rank first. Parameter names
are the Hugging Face `DeepseekV3Attention` names so checkpoints load by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seekling.config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype (as DeepSeek and transformers do).
        # F.rms_norm is one fused kernel (the pow/mean/rsqrt/mul chain was five ops and as many copies).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the decoupled RoPE, YaRN-corrected when rope_scaling says so.

    Returns (inv_freq [d/2], attention_factor): YaRN multiplies cos/sin by
    mscale(factor, mscale) / mscale(factor, mscale_all_dim); the mscale_all_dim part goes into
    the softmax scale instead (config.softmax_scale).
    """
    d, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    rs = config.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return 1.0 / pos_freqs, 1.0
    factor = rs["factor"]
    original = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        return d * math.log(original / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1: keep the original frequency (high-frequency dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif rs.get("mscale") and rs.get("mscale_all_dim"):
        attention_factor = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [..., T] -> cos, sin [..., T, d/2] (fp32)."""
        freqs = position_ids[..., None].float() * self.inv_freq
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek lays them out.

    x: [B, T, H, d]; cos/sin: [B or 1, T, d/2]. The result is written de-interleaved (all first
    elements of the pairs, then all second ones) — a fixed permutation applied to queries and keys
    alike, so q·k is unchanged and we skip an interleaving copy (transformers does the same).
    """
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
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

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B,T,H,d_nope] and the rotated q_pe [B,T,H,d_rope]."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a token leaves in the KV cache: c_KV [B,T,kv_lora_rank] and the rotated k_pe [B,T,d_rope]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
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
