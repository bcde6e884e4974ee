"""GGUF export: a seekling checkpoint as one file that llama.cpp (and Ollama, which runs llama.cpp) loads.

    seekling export --model runs/x/rl --format gguf --out x.gguf [--outtype f32|f16|q8_0]
    export_gguf("runs/x/rl", "x.gguf")        # writes x.gguf and a Modelfile beside it

The keys and tensors are those llama.cpp's own `convert_hf_to_gguf.py` writes and its loader reads; each model
family says how its checkpoints map onto them (seekling/model/families/: DeepSeek-V3/V2 -> `deepseek2`, Qwen2,
Qwen3, Llama -> `qwen2`, `qwen3`, `llama`), and the same names serve GGUF import. This module adds what every
family shares:
- The tokenizer: byte-level BPE as tokenizer.ggml.model "gpt2", the pre-tokenizer named after the split
  regex of tokenizer.json (seekling's is Qwen2's: "qwen2"), tokens / types / merges, bos / eos / pad, the
  chat template. add_bos_token is written (false unless tokenizer_config.json says otherwise): our chat
  template writes bos itself, so llama.cpp must not add a second one.
- general.* keys, the sampling defaults of generation_config.json, and the tensor types (the converter's rules).
The file is written tensor by tensor (two passes over the model: shapes, then data), so the peak is the
loaded model plus one converted tensor.
"""

from __future__ import annotations

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
from seekling.model.families import family_of
from seekling.model.load import load_pretrained
from seekling.tokenizer import ASSISTANT, BOS, EOS, PRE_TOKENIZERS, USER, Tokenizer, load_tokenizer

Q = gguf.GGMLQuantizationType
OUTTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
            "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}

# Split regexes of tokenizer.json -> the llama.cpp pre-tokenizer that implements them.
PRE_TOKENIZER_NAMES = {regexes[0]: name for name, regexes in PRE_TOKENIZERS.items()
                       if len(regexes) == 1 and name in ("qwen2", "llama-bpe")}

# generation_config.json defaults (SamplingParams names) -> general.sampling.* (llama.cpp's defaults)
SAMPLING_KEYS = {"temperature": "temp", "top_p": "top_p"}

TensorSource = Callable[[], Iterator[tuple[str, torch.Tensor]]]


# ----------------------------------------------------------------------------- metadata


def tokenizer_keys(tok: Tokenizer, vocab_size: int, directory: Path) -> dict[str, Any]:
    """tokenizer.ggml.* and the chat template, from the tokenizer files (as gguf's SpecialVocab reads them)."""
    spec = json.loads(tok.tokenizer.to_str())
    pre = PRE_TOKENIZER_NAMES.get(split_regex(spec))
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
    family = family_of(model)
    arch, tensors = family.gguf_arch, lambda: family.gguf_tensors(model)
    keys = {f"{arch}.{k}": v for k, v in family.gguf_keys(model.config).items()}
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
