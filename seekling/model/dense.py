"""Dense decoders for the released DeepSeek-R1 distills: `qwen2`, `qwen3` and `llama` (HF layout).

The R1 distills (Qwen-1.5B/7B/14B/32B, Llama-8B/70B, R1-0528-Qwen3-8B) are plain pre-norm decoders: GQA
attention with RoPE (Llama-3.1's "llama3" frequency scaling for the Llama ones), q/k/v biases for Qwen2,
an RMSNorm of each query and key head before RoPE for Qwen3 (q_norm / k_norm), RMSNorm and a SwiGLU MLP.
Parameter names are exactly transformers' (`model.embed_tokens`, `model.layers.L.self_attn.{q,k,v,o}_proj`,
`self_attn.{q,k}_norm`, `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`,
`model.norm`, `lm_head`), so safetensors load by name. The families (seekling/model/families/) say which
of these options each model type has; this module knows none of them by name.

    model = seekling.load_pretrained("DeepSeek-R1-Distill-Qwen-1.5B")   # seekling/model/load.py
    logits = model(input_ids)                                # [B, T, V], full causal forward
    model.generation_defaults  # {"temperature": 0.6, "top_p": 0.95} -> SamplingParams(**...)
    model.eos_token_ids        # from generation_config.json (else config.json)

Inference (the engine's step) runs `infer` on a paged cache that holds the rotated keys and the values of
every KV head, [layer, block, slot, 2, n_kv_heads, head_dim]; GQA reads each KV head once for its group of
query heads (seekling/model/layers.py `attend`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekling.model.config import check_field_types
from seekling.model.layers import (
    MLP,
    Batch,
    CausalLM,
    RMSNorm,
    alias,
    apply_rope,
    attend,
    embedding,
    fuse_parameters,
    gather_cache,
    per_sequence,
    rope_frequencies,
)
from seekling.model.quant import Int8Weight, embed, linear, quantize


@dataclass
class DenseConfig:
    """The subset of a Qwen2Config / Qwen3Config / LlamaConfig that the forward needs (HF field names, plus the
    options a family fixes: o_proj_bias, qk_norm)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "llama3" | "yarn", "factor", ...}
    rope_freq_factors: list[float] | None = None  # each frequency divided by its factor (a GGUF's rope_freqs)
    attention_bias: bool = False  # q/k/v biases
    o_proj_bias: bool = False  # a bias on o_proj too (Llama's and Qwen3's attention_bias; not Qwen2's)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_id: int | None = None  # config.json's (generation_config.json's list, when loaded, comes first)

    def __post_init__(self) -> None:
        check_field_types(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], **family: Any) -> DenseConfig:
        """config.json's fields; `family` are the options its family fixes (e.g. qk_norm=True for qwen3)."""
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method")
            raise ValueError(f"unsupported: a quantized checkpoint ({method}); use the bf16/fp32 release")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act={d['hidden_act']!r} (only silu)")
        if d.get("use_sliding_window"):
            raise ValueError("unsupported: use_sliding_window=true (the R1 distills use full attention)")
        # transformers >= 5 writes rope_parameters {"rope_type", "rope_theta", ...}; released checkpoints
        # have the older rope_theta + rope_scaling pair. Read both.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "yarn"):
            raise ValueError(f"unsupported rope scaling type {rope_type!r} (default, llama3 or yarn)")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        attention_bias = bool(d.get("attention_bias", False))
        options = {"attention_bias": attention_bias, "o_proj_bias": attention_bias, **family}
        return cls(
            model_type=d["model_type"],
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope if rope_type != "default" else None,
            rope_freq_factors=d.get("rope_freq_factors"),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            eos_token_id=(eos[0] if eos else None) if isinstance(eos, list) else eos,
            **options,
        )


def rope_inv_freq(cfg: DenseConfig) -> tuple[torch.Tensor, float]:
    """RoPE's frequencies over head_dim and the cos/sin factor (`layers.rope_frequencies`: default, Llama-3.1's
    llama3 scaling, YaRN), or the frequencies divided by explicit factors (a GGUF's rope_freqs)."""
    inv_freq, factor = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32, device="cpu")
    return inv_freq, factor


class Attention(nn.Module):
    def __init__(self, cfg: DenseConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # its layer of the engine's paged cache
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        # `infer` reads [q | k | v] as one matmul (weights and biases), built by `prepare`.
        self.w_qkv: torch.Tensor | Int8Weight | None = None
        self.b_qkv: torch.Tensor | None = None
        self.w_o: torch.Tensor | Int8Weight | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal attention over full sequences x [B, T, h] (training, evaluation, parity tests)."""
        B, T, _ = x.shape
        q, k = self.q_proj(x).view(B, T, self.n_heads, self.head_dim), self.k_proj(x).view(B, T, self.n_kv_heads, -1)
        q, k = self.rotate(q, k, cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=T > 1, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys [..., heads, head_dim] normalised per head (qk_norm), then rotated."""
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin, interleaved=False), apply_rope(k, cos, sin, interleaved=False)

    def projections(self) -> list[nn.Parameter]:
        return [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]

    def prepare(self, quantize_to: str | None = None) -> list[nn.Parameter]:
        """q, k and v as one matmul: views of one fused tensor (fp32 / bf16), or an int8 copy (returns the
        parameters it replaced, for the caller to free)."""
        sources = self.projections()
        self.b_qkv = None if self.q_proj.bias is None else fuse_parameters(
            [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias], self)
        if quantize_to is None:
            self.w_qkv, self.w_o = fuse_parameters(sources, self), alias(self.o_proj.weight, self)
            return []
        self.w_qkv = quantize(sources, quantize_to)
        self.w_o = quantize(self.o_proj.weight, quantize_to)
        return sources + [self.o_proj.weight]

    def infer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """GQA over the packed rows x [N, h] on the paged cache; -> (output [N, h], the new cache entries
        [N, 2, n_kv_heads, head_dim]: the rotated key and the value of every KV head)."""
        N, H, Hkv, D = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = linear(x, self.w_qkv, self.b_qkv).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k = self.rotate(q.view(N, H, D), k.view(N, Hkv, D), cos, sin)
        entry = torch.stack([k, v.view(N, Hkv, D)], dim=1)
        kv = torch.cat([gather_cache(batch, self.layer_idx), per_sequence(entry, batch)], dim=1)
        o = attend(q, kv[:, :, 0], kv[:, :, 1], batch, 1 / math.sqrt(D))
        return linear(o.flatten(1), self.w_o, self.o_proj.bias), entry


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DenseConfig, layer_idx: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def prepare(self, quantize_to: str | None = None) -> list[nn.Parameter]:
        return self.self_attn.prepare(quantize_to) + self.mlp.prepare(quantize_to)

    def infer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        a, entry = self.self_attn.infer(self.input_layernorm(x), cos, sin, batch)
        x = x + a
        return x + self.mlp.infer(self.post_attention_layernorm(x)), entry


class DenseBody(nn.Module):
    """`model.*` of the HF layout: embeddings, blocks, final norm. Returns hidden states."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., 1, head_dim / 2] (the 1 broadcasts over heads): angles in fp32 (as transformers), then
        the model dtype; times YaRN's attention factor when the RoPE is scaled so."""
        freqs = positions[..., None, None].float() * self.inv_freq.float()
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class DenseModel(CausalLM):
    """Qwen2ForCausalLM / LlamaForCausalLM with transformers' parameter names."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.config = cfg
        self.model = DenseBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.generation_defaults: dict[str, Any] = {}  # filled by the loader from generation_config.json
        self.eos_token_ids: list[int] = []
        self.init_inference()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, T, V] of full causal sequences (the last `logits_to_keep` positions only when > 0)."""
        h = self.model(input_ids, position_ids)
        return self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def reset_buffers(self, device: torch.device) -> None:
        """Compute the buffers no checkpoint stores (the loader builds the model on meta): the RoPE frequencies."""
        inv_freq, self.model.attention_factor = rope_inv_freq(self.config)
        self.model.inv_freq = inv_freq.to(device)

    # --- inference (the engine's interface; seekling.model.Transformer has the same) -----------------------
    def cache_entry_shape(self) -> tuple[int, ...]:
        """One token's entry in one layer of the paged cache: rotated keys and values per KV head."""
        return (2, self.config.num_key_value_heads, self.config.head_dim)

    def num_cache_layers(self, speculative: bool) -> int:
        if speculative:
            raise ValueError(f"speculative decoding drafts with DeepSeek-V3's MTP module; this "
                             f"{self.config.model_type} model has none (run it with speculative=False)")
        return self.config.num_hidden_layers

    def infer(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder over the batch's new tokens (after `prepare`): -> (final normed hidden states [N, h],
        every layer's new cache entries [layers, N, 2, n_kv_heads, head_dim]). The cache is only read."""
        x = embed(batch.input_ids, self.embed_w)
        cos, sin = self.model.rope(batch.positions, x.dtype)
        entries = []
        for layer in self.model.layers:
            x, entry = layer.infer(x, cos, sin, batch)
            entries.append(entry)
        return self.model.norm(x), torch.stack(entries)
