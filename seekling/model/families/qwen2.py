"""Qwen2 (`qwen2`, Qwen2ForCausalLM; the DeepSeek-R1-Distill-Qwen models): Llama's decoder with biases on q, k
and v (never on o_proj), no RoPE scaling. Tools: Qwen2.5's <tool_call> JSON (Hermes style). GGUF (llama.cpp's
`qwen2`): NEOX rope, so q/k rows are stored as they are.
"""

from __future__ import annotations

from seekling.model.families.llama import Llama
from seekling.tokenizer import EOS, QWEN_TOOLS_TEMPLATE


class Qwen2(Llama):
    model_type = "qwen2"
    gguf_arch = "qwen2"
    chat_template = QWEN_TOOLS_TEMPLATE
    tool_format = "hermes"
    stop_tokens = (EOS, "<|im_end|>", "<|endoftext|>")
    options = {"attention_bias": True, "o_proj_bias": False}
    rope_pairs = False
