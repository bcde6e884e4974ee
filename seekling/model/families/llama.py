"""Llama (`llama`, LlamaForCausalLM; the DeepSeek-R1-Distill-Llama models): the dense decoder of
seekling/model/dense.py with Llama-3.1's "llama3" RoPE scaling and attention biases on q/k/v/o when
attention_bias. The dense families (Qwen2, Qwen3) derive from this one.

Tools: Llama 3.1's JSON calling. GGUF (llama.cpp's `llama`): q/k rows go from transformers' rotate-half layout
to GGML's interleaved pairs (the converter's `permute`), and Llama-3 rope scaling becomes the `rope_freqs`
tensor (each frequency's divisor), read back into the config as `rope_freq_factors`. YaRN (Qwen3's R1-0528
distill extends its context with it) is rope.scaling.* keys; llama.cpp multiplies its yarn_attn_factor into
YaRN's default mscale, as vLLM reads a config's attn_factor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from seekling.model.config import yarn_mscale
from seekling.model.dense import DenseConfig, DenseModel, rope_inv_freq
from seekling.model.family import Family, renamed_from_gguf, shape_fields, shape_keys
from seekling.model.gguf_file import GGUFFile
from seekling.model.layers import CausalLM, rope_frequencies
from seekling.tokenizer import EOS, LLAMA_TOOLS_TEMPLATE


class Llama(Family):
    model_type = "llama"
    gguf_arch = "llama"
    chat_template = LLAMA_TOOLS_TEMPLATE
    tool_format = "llama3"
    stop_tokens = (EOS, "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    options: dict[str, Any] = {}  # DenseConfig options the family fixes (see DenseConfig)
    rope_pairs = True  # GGUF q/k rows hold GGML's interleaved rope pairs
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight",
        **{f"self_attn.{hf}_proj.{p}": f"attn_{gg}.{p}" for hf, gg in
           (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for p in ("weight", "bias")},
        "post_attention_layernorm.weight": "ffn_norm.weight",
        **{f"mlp.{x}_proj.{p}": f"ffn_{x}.{p}" for x in ("gate", "up", "down") for p in ("weight", "bias")},
    }

    def read_config(self, raw: dict[str, Any]) -> DenseConfig:
        return DenseConfig.from_dict(raw, **self.options)

    def build(self, config: DenseConfig) -> CausalLM:
        return DenseModel(config)

    # --- GGUF export ---------------------------------------------------------------------------------------
    def gguf_keys(self, cfg: DenseConfig) -> dict[str, Any]:
        return {
            **shape_keys(cfg),
            "attention.head_count_kv": cfg.num_key_value_heads,
            "attention.key_length": cfg.head_dim,
            "attention.value_length": cfg.head_dim,
            "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
            "rope.dimension_count": cfg.head_dim,
            "rope.freq_base": float(cfg.rope_theta),
            **yarn_keys(cfg),
        }

    @staticmethod
    def _freq_factors(cfg: DenseConfig) -> bool:
        """llama.cpp takes Llama-3's scaling (and any explicit factors) as the rope_freqs tensor."""
        rs = cfg.rope_scaling or {}
        return rs.get("rope_type", rs.get("type")) == "llama3" or cfg.rope_freq_factors is not None

    def gguf_tensors(self, model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
        cfg: DenseConfig = model.config
        for name, t in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            heads = self._rope_heads(name, cfg)
            yield self.gguf_name(name), t if heads is None else halves_to_pairs(t, heads)
        if self._freq_factors(cfg):  # llama3 scaling as divisors
            plain, _ = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None, rope_freq_factors=None))
            yield "rope_freqs.weight", plain / rope_inv_freq(cfg)[0]

    def _rope_heads(self, name: str, cfg: DenseConfig) -> int | None:
        """The heads whose rows a rope projection (q / k weight or bias) holds, when GGUF permutes them."""
        if not self.rope_pairs:
            return None
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return cfg.num_attention_heads
        return cfg.num_key_value_heads if name.endswith(("k_proj.weight", "k_proj.bias")) else None

    # --- GGUF import ---------------------------------------------------------------------------------------
    def config_from_gguf(self, f: GGUFFile) -> dict[str, Any]:
        fields = shape_fields(f)
        heads = fields["num_attention_heads"]
        raw = {**fields, "model_type": self.model_type,
               "num_key_value_heads": f.get("attention.head_count_kv", heads),
               "head_dim": f.get("attention.key_length") or fields["hidden_size"] // heads,
               "attention_bias": "blk.0.attn_q.bias" in f.tensors, "mlp_bias": "blk.0.ffn_up.bias" in f.tensors}
        if "rope_freqs.weight" in f.tensors:
            raw["rope_freq_factors"] = f.tensors["rope_freqs.weight"].read().tolist()
        kind = f.get("rope.scaling.type", "none")
        if kind == "yarn":
            raw["rope_scaling"] = {"rope_type": "yarn", "factor": float(f["rope.scaling.factor"]),
                                   "original_max_position_embeddings": int(f["rope.scaling.original_context_length"]),
                                   "beta_fast": float(f.get("rope.scaling.yarn_beta_fast", 32.0)),
                                   "beta_slow": float(f.get("rope.scaling.yarn_beta_slow", 1.0)),
                                   "attn_factor": float(f.get("rope.scaling.yarn_attn_factor", 1.0))}
        elif kind not in ("none", None):
            raise ValueError(f"{f.path.name}: rope scaling {kind!r} is not supported for {f.arch} (yarn only)")
        return raw

    def tensors_from_gguf(self, f: GGUFFile, cfg: DenseConfig) -> dict[str, Any]:
        out: dict[str, Any] = renamed_from_gguf(f, self.layer_names)
        for name, t in out.items():
            heads = self._rope_heads(name, cfg)
            if heads is not None:
                out[name] = t.select(pairs_to_halves_rows(t.shape[0], heads), t.shape)
        return out


def yarn_keys(cfg: DenseConfig) -> dict[str, Any]:
    """YaRN as llama.cpp's keys: its attention factor multiplies mscale(factor), so ours is divided by it."""
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) != "yarn":
        return {}
    if rs.get("truncate", True) is False:
        raise ValueError("llama.cpp cannot reproduce YaRN with truncate=false")
    _, factor = rope_frequencies(cfg.head_dim, cfg.rope_theta, rs)
    return {"rope.scaling.type": "yarn", "rope.scaling.factor": float(rs["factor"]),
            "rope.scaling.original_context_length": int(rs["original_max_position_embeddings"]),
            "rope.scaling.yarn_beta_fast": float(rs.get("beta_fast") or 32),
            "rope.scaling.yarn_beta_slow": float(rs.get("beta_slow") or 1),
            "rope.scaling.yarn_attn_factor": factor / yarn_mscale(rs["factor"])}


def halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from (first halves, second halves) to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pairs_to_halves_rows(rows: int, n_heads: int) -> np.ndarray:
    """`halves_to_pairs` undone, as row indices: Hugging Face row (head, half, i) is GGUF row (head, i, half)."""
    d = rows // n_heads
    return np.arange(rows).reshape(n_heads, d // 2, 2).swapaxes(1, 2).reshape(-1)
