"""Qwen3 (`qwen3`, Qwen3ForCausalLM; DeepSeek-R1-0528-Qwen3-8B, Ollama's `deepseek-r1:8b`): Qwen2's decoder with
an RMSNorm over each query and key head before RoPE (q_norm / k_norm), and Llama's bias rule (attention_bias,
off in the releases, covers o_proj too). Chat: DeepSeek-R1-0528's format, whose generation prompt ends at
`<｜Assistant｜>`: the model opens its own `<think>` block. GGUF (llama.cpp's `qwen3`): attn_q_norm, attn_k_norm.
"""

from __future__ import annotations

from seekling.model.families.qwen2 import Qwen2
from seekling.tokenizer import R1_0528_TEMPLATE


class Qwen3(Qwen2):
    model_type = "qwen3"
    gguf_arch = "qwen3"
    chat_template = R1_0528_TEMPLATE
    tool_format = "deepseek"  # R1-0528's tool-call tokens
    options = {"qk_norm": True}
    layer_names = {**Qwen2.layer_names, "self_attn.q_norm.weight": "attn_q_norm.weight",
                   "self_attn.k_norm.weight": "attn_k_norm.weight"}
