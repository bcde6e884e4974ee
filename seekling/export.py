"""GGUF export: a seekling checkpoint as one file that llama.cpp (and Ollama, which runs llama.cpp) loads.

    seekling export --model runs/x/rl --format gguf --out x.gguf [--outtype f32|f16|q8_0]
    export_gguf("runs/x/rl", "x.gguf")        # writes x.gguf and a Modelfile beside it

The keys and tensors are those llama.cpp's own `convert_hf_to_gguf.py` writes and its loader reads
(`src/models/deepseek2.cpp`, `qwen2.cpp`, `llama.cpp`), with the gaps that converter leaves for our
checkpoints closed:
- DeepSeek-V3 -> arch `deepseek2`. MLA runs there as MQA over the latent (head_count_kv 1, key_length
  kv_lora_rank + rope dims, value_length kv_lora_rank; key/value_length_mla the per-head sizes), so
  kv_b_proj is split per head into k_b (transposed) and v_b. `attention.q_lora_rank` is 0 when queries are
  not compressed: the loader requires the key unless the layer count is V2-Lite's, and the converter
  leaves it out for `q_lora_rank: null`. The router is sigmoid (expert_gating_func 2; without the key
  llama.cpp falls back to softmax), top-k on scores + e_score_correction_bias (exp_probs_b), weights
  renormalised (expert_weights_norm) and scaled (expert_weights_scale); the routed experts of a layer are
  stacked into one [n_expert, out, in] tensor. MTP layers are left out, as the converter does for
  deepseek2 (llama.cpp's MTP graph for it also needs q_lora_rank > 0). RoPE pairs are interleaved as in
  GGML's "normal" rope, so no permutation.
- Qwen2 / Llama (the R1 distills) -> arch `qwen2` / `llama`. Llama's q/k rows go from transformers'
  rotate-half layout to GGML's interleaved pairs (the converter's `permute`); Llama-3 rope scaling
  becomes the `rope_freqs` tensor.
- The tokenizer: byte-level BPE as tokenizer.ggml.model "gpt2", the pre-tokenizer named after the split
  regex of tokenizer.json (seekling's is Qwen2's: "qwen2"), tokens / types / merges, bos / eos / pad, the
  chat template. add_bos_token is written (false unless tokenizer_config.json says otherwise): our chat
  template writes bos itself, so llama.cpp must not add a second one.
The file is written tensor by tensor (two passes over the model: shapes, then data), so the peak is the
loaded model plus one converted tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from seekling.atomic import atomic_path, write_text
from seekling.checkpoint import read_generation_config
from seekling.config import ModelConfig
from seekling.model.dense import DenseConfig, DenseModel, rope_inv_freq
from seekling.model.load import load_pretrained
from seekling.tokenizer import ASSISTANT, BOS, EOS, SPLIT_PATTERN, USER, Tokenizer, load_tokenizer

Q = gguf.GGMLQuantizationType
OUTTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
            "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}

# Split regexes of tokenizer.json -> the llama.cpp pre-tokenizer that implements them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {SPLIT_PATTERN: "qwen2", LLAMA3_SPLIT: "llama-bpe"}

# Hugging Face tensor names -> GGUF names, per architecture; "{L}" is the block index.
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
DEEPSEEK2_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
# split / stacked in deepseek2_tensors: kv_b_proj -> attn_k_b + attn_v_b, experts.E.X_proj -> ffn_X_exps
DEEPSEEK2_EXPERTS = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight",
                     "down_proj": "ffn_down_exps.weight"}
DENSE_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    **{f"self_attn.{hf}_proj.{p}": f"attn_{gg}.{p}" for hf, gg in
       (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for p in ("weight", "bias")},
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"mlp.{x}_proj.{p}": f"ffn_{x}.{p}" for x in ("gate", "up", "down") for p in ("weight", "bias")},
}

# generation_config.json defaults (SamplingParams names) -> general.sampling.* (llama.cpp's defaults)
SAMPLING_KEYS = {"temperature": "temp", "top_p": "top_p"}

TensorSource = Callable[[], Iterator[tuple[str, torch.Tensor]]]


# ----------------------------------------------------------------------------- tensors


def rename(hf_name: str, layer_names: dict[str, str]) -> str:
    """The GGUF name of a Hugging Face tensor name (model.layers.L.<x> -> blk.L.<table[x]>)."""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in layer_names:
        return f"blk.{parts[2]}.{layer_names[parts[3]]}"
    raise ValueError(f"no GGUF name for tensor {hf_name!r}")


def deepseek2_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of a seekling Transformer, main layers only (the MTP layers are dropped)."""
    cfg: ModelConfig = model.config
    state = model.state_dict()
    mtp_prefixes = tuple(f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers))
    for name, t in state.items():
        if name.startswith(mtp_prefixes) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if name.endswith("kv_b_proj.weight"):
            yield from split_kv_b(name, t, cfg)
        elif ".mlp.experts." in name:
            if name.endswith(".experts.0.down_proj.weight"):  # once per layer: the whole stack
                yield from stack_experts(name.split(".mlp.")[0], state, cfg.n_routed_experts)
        else:
            yield rename(name, DEEPSEEK2_NAMES), t


def split_kv_b(name: str, w: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """kv_b_proj [H*(nope+v), rank] -> k_b [H, rank, nope] (transposed, to multiply the queries into the
    latent) and v_b [H, v, rank], the layout llama.cpp's absorbed MLA reads."""
    layer = name.split(".")[2]
    per_head = w.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
    k_b, v_b = per_head.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
    yield f"blk.{layer}.attn_k_b.weight", k_b.transpose(1, 2)
    yield f"blk.{layer}.attn_v_b.weight", v_b


def stack_experts(prefix: str, state: dict[str, torch.Tensor], n_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    layer = prefix.split(".")[2]
    for proj, gguf_name in DEEPSEEK2_EXPERTS.items():
        stacked = torch.stack([state[f"{prefix}.mlp.experts.{e}.{proj}.weight"] for e in range(n_experts)])
        yield f"blk.{layer}.{gguf_name}", stacked


def dense_tensors(model: DenseModel) -> Iterator[tuple[str, torch.Tensor]]:
    cfg = model.config
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if cfg.model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = halves_to_pairs(t, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = halves_to_pairs(t, cfg.num_key_value_heads)
        yield rename(name, DENSE_NAMES), t
    if cfg.rope_scaling is not None:  # llama3 scaling: llama.cpp divides each frequency by its factor
        plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
        yield "rope_freqs.weight", plain / rope_inv_freq(cfg)


def halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from (first halves, second halves) to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- metadata


def _shape_keys(cfg: ModelConfig | DenseConfig) -> dict[str, Any]:
    """The GGUF keys both families fill from the same config fields."""
    return {
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "block_count": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "attention.head_count": cfg.num_attention_heads,
    }


def deepseek2_keys(cfg: ModelConfig) -> dict[str, Any]:
    n_dense = cfg.num_hidden_layers if cfg.n_routed_experts == 0 else cfg.first_k_dense_replace
    # llama.cpp asserts topk_group < n_group; keeping every group (topk_group == n_group) is no grouping.
    groups = (cfg.n_group, cfg.topk_group) if cfg.topk_group < cfg.n_group else (1, 1)
    keys = {
        **_shape_keys(cfg),
        "attention.head_count_kv": 1,
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "attention.q_lora_rank": cfg.q_lora_rank or 0,
        "attention.kv_lora_rank": cfg.kv_lora_rank,
        "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "attention.value_length": cfg.kv_lora_rank,
        "attention.key_length_mla": cfg.qk_head_dim,
        "attention.value_length_mla": cfg.v_head_dim,
        "rope.dimension_count": cfg.qk_rope_head_dim,
        "rope.freq_base": float(cfg.rope_theta),
        "leading_dense_block_count": n_dense,
        "expert_count": cfg.n_routed_experts,
        "expert_used_count": cfg.num_experts_per_tok,
        "expert_shared_count": cfg.n_shared_experts,
        "expert_feed_forward_length": cfg.moe_intermediate_size,
        "expert_group_count": groups[0],
        "expert_group_used_count": groups[1],
        "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID),
        "expert_weights_norm": cfg.norm_topk_prob,
        "expert_weights_scale": float(cfg.routed_scaling_factor),
        **yarn_keys(cfg.rope_scaling),
    }
    return {f"deepseek2.{k}": v for k, v in keys.items()}


def yarn_keys(rs: dict[str, Any] | None) -> dict[str, Any]:
    """The YaRN keys as the converter writes them. llama.cpp computes the attention scale from
    yarn_log_multiplier (0.1 * mscale_all_dim) and takes mscale equal to it, which reproduces seekling's
    (DeepSeek's) YaRN exactly only when mscale == mscale_all_dim (DeepSeek-V3: 1 and 1; V2-Lite: 0.707)."""
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return {}
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None or not m or m != m_all or rs.get("truncate", True) is False:
        raise ValueError(f"llama.cpp cannot reproduce this YaRN configuration ({rs}): it needs mscale == "
                         "mscale_all_dim, no attention_factor and truncated correction dims")
    return {"rope.scaling.type": "yarn", "rope.scaling.factor": float(rs["factor"]),
            "rope.scaling.original_context_length": int(rs["original_max_position_embeddings"]),
            "rope.scaling.yarn_beta_fast": float(rs.get("beta_fast") or 32),
            "rope.scaling.yarn_beta_slow": float(rs.get("beta_slow") or 1),
            "rope.scaling.yarn_log_multiplier": 0.1 * float(m_all)}


def dense_keys(cfg: DenseConfig) -> dict[str, Any]:
    keys = {
        **_shape_keys(cfg),
        "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.key_length": cfg.head_dim,
        "attention.value_length": cfg.head_dim,
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "rope.dimension_count": cfg.head_dim,
        "rope.freq_base": float(cfg.rope_theta),
    }
    return {f"{cfg.model_type}.{k}": v for k, v in keys.items()}


def tokenizer_keys(tok: Tokenizer, vocab_size: int, directory: Path) -> dict[str, Any]:
    """tokenizer.ggml.* and the chat template, from the tokenizer files (as gguf's SpecialVocab reads them)."""
    spec = json.loads(tok.tokenizer.to_str())
    pre = PRE_TOKENIZERS.get(split_regex(spec))
    if spec["model"]["type"] != "BPE" or pre is None:
        raise ValueError(f"tokenizer in {directory} is not a byte-level BPE with a pre-tokenizer llama.cpp knows "
                         f"(split regex {split_regex(spec)!r})")
    vocab = {i: t for t, i in tok.tokenizer.get_vocab(with_added_tokens=True).items()}
    if max(vocab) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(vocab)}, beyond the model's vocab_size {vocab_size}")
    added = {a["id"]: a["special"] or looks_special(a["content"]) for a in spec.get("added_tokens", [])}
    types = [gguf.TokenType.UNUSED if i not in vocab else gguf.TokenType.CONTROL if added.get(i)
             else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    keys: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [vocab.get(i, f"[PAD{i}]") for i in range(vocab_size)],
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(config.get("add_bos_token", False)),
        "tokenizer.ggml.add_eos_token": bool(config.get("add_eos_token", False)),
    }
    for key, token_id in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("padding", tok.pad_token_id)):
        if token_id is not None:
            keys[f"tokenizer.ggml.{key}_token_id"] = token_id
    if tok.chat_template:
        keys["tokenizer.chat_template"] = tok.chat_template
    return keys


def looks_special(token: str) -> bool:
    """The converter's rule: added tokens shaped <|...|> or <｜...｜> are control tokens even when
    tokenizer.json does not mark them special."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def split_regex(spec: dict[str, Any]) -> str | None:
    """The regex of the first Split in tokenizer.json's pre_tokenizer (a Sequence or a lone Split)."""
    pre = spec.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            return p["pattern"].get("Regex")
    return None


# ----------------------------------------------------------------------------- writing


def tensor_qtype(name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """The converter's rules: 1-D tensors, norms, biases and the router stay F32; Q8_0 needs rows of 32."""
    if len(shape) == 1 or not name.endswith(".weight") or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return Q.F32
    qtype = OUTTYPES[outtype][0]
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    data = t.detach().to(torch.float32).contiguous().numpy()
    return data if qtype == Q.F32 else gguf.quants.quantize(data, qtype)


def nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def add_key(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    """Typed as llama.cpp's loader expects: uint32 counts, float32 reals, int32 token types."""
    V = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif value and isinstance(value[0], str):
        writer.add_key_value(key, value, V.ARRAY, sub_type=V.STRING)
    else:
        writer.add_key_value(key, value, V.ARRAY, sub_type=V.INT32)


def write_gguf(path: Path, arch: str, keys: dict[str, Any], tensors: TensorSource, outtype: str) -> None:
    """Header and tensor infos from a first pass over `tensors`, then the data from a second one."""
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, value in keys.items():
            add_key(writer, key, value)
        for name, t in tensors():
            shape = tuple(t.shape)
            qtype = tensor_qtype(name, shape, outtype)
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, t in tensors():
            writer.write_tensor_data(encode(t, tensor_qtype(name, tuple(t.shape), outtype)))
        writer.close()


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f32",
                tokenizer_dir: str | Path | None = None) -> Path:
    """Write `out` (GGUF) and a Modelfile beside it; returns the Modelfile's path."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose from {sorted(OUTTYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else model_dir
    tok = load_tokenizer(tok_dir)
    model = load_pretrained(model_dir)
    if isinstance(model, DenseModel):
        arch, keys, tensors = model.config.model_type, dense_keys(model.config), lambda: dense_tensors(model)
    else:
        arch, keys, tensors = "deepseek2", deepseek2_keys(model.config), lambda: deepseek2_tensors(model)
    general = {"general.type": "model", "general.name": model_dir.resolve().name,
               "general.file_type": int(OUTTYPES[outtype][1]), "general.quantization_version": gguf.GGML_QUANT_VERSION}
    generation = read_generation_config(model_dir)
    sampling = {f"general.sampling.{gguf_key}": float(generation[0][ours]) for ours, gguf_key in SAMPLING_KEYS.items()
                if ours in generation[0]}
    keys = {**general, **sampling, **keys, **tokenizer_keys(tok, model.config.vocab_size, tok_dir)}
    with torch.no_grad():
        write_gguf(out, arch, keys, tensors, outtype)
    modelfile = out.parent / "Modelfile"
    write_text(modelfile, ollama_modelfile(out.name, tok, generation))
    return modelfile


# ----------------------------------------------------------------------------- Ollama

# Ollama's Go template for DeepSeek-R1's chat format, as seekling's chat template renders it: bos, the system
# prompt, the turns (earlier answers without their reasoning: Ollama keeps that in .Thinking), and the
# generation prompt that opens the think block.
R1_TEMPLATE = (
    BOS + "{{ if .System }}{{ .System }}{{ end }}"
    "{{- range $i, $_ := .Messages }}"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
    "{{- if eq .Role \"user\" }}" + USER + "{{ .Content }}"
    "{{- else if eq .Role \"assistant\" }}" + ASSISTANT + "{{ .Content }}{{ if not $last }}" + EOS + "{{ end }}"
    "{{- end }}"
    "{{- if and $last (ne .Role \"assistant\") }}" + ASSISTANT + "<think>\n{{ end }}"
    "{{- end }}"
)


def ollama_modelfile(gguf_name: str, tok: Tokenizer, generation: tuple[dict[str, Any], list[int]]) -> str:
    """`ollama create NAME -f Modelfile`: the R1 template when the tokenizer has the R1 chat tokens (else
    Ollama picks a template from the GGUF's chat template), stop at every eos, the checkpoint's sampling."""
    defaults, eos_ids = generation
    lines = [f"FROM ./{gguf_name}"]
    has_r1_tokens = all(tok.convert_tokens_to_ids(t) is not None for t in (USER, ASSISTANT))
    if has_r1_tokens:
        lines.append(f'TEMPLATE """{R1_TEMPLATE}"""')
    stops = [tok.id_to_token(i) for i in eos_ids or [tok.eos_token_id]] + ([USER] if has_r1_tokens else [])
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in dict.fromkeys(stops) if s]
    lines += [f"PARAMETER {k} {defaults[k]}" for k in ("temperature", "top_p", "top_k") if k in defaults]
    return "\n".join(lines) + "\n"
