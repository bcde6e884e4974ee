"""A model family: everything seekling knows about one kind of checkpoint (one Hugging Face `model_type`).

    family = FAMILIES["qwen3"]                   # seekling/model/families/: the registry
    config = family.read_config(config_json)     # config.json -> the model's config
    model = family.build(config)                 # its module (DenseModel, Transformer)
    family.gguf_tensors(model)                   # GGUF names and layouts, for export ...
    family.tensors_from_gguf(gguf_file, config)  # ... and for import
    family.chat_template, family.tool_format, family.stop_tokens, family.mtp

A family is a class whose attributes and methods say how it differs from the family it derives from (as
transformers' modular files do): DeepSeek-V2 is DeepSeek-V3 with other routing defaults and no MTP; Qwen3 is
Qwen2 with q/k norms. The parameter names of seekling's modules are the Hugging Face names, so a family maps
names only for GGUF (llama.cpp's names, and the tensors its converter splits, stacks or permutes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from seekling.model.gguf_file import GGUFFile, GGUFTensor
from seekling.model.layers import CausalLM
from seekling.tokenizer import CHAT_TEMPLATE, EOS

# Hugging Face tensor names outside the layers -> GGUF names (every family)
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


class Family:
    model_type: str = ""  # config.json's model_type: the registry's key
    gguf_arch: str = ""  # general.architecture of its GGUF files (llama.cpp's name)
    layer_names: dict[str, str] = {}  # HF names inside model.layers.L -> GGUF names inside blk.L (plain renames)
    chat_template: str = CHAT_TEMPLATE  # its chat format, for a checkpoint that brings none
    tool_format: str = "deepseek"  # how its answers call tools (seekling/serve/tools.py)
    stop_tokens: tuple[str, ...] = (EOS,)  # tokens that end a turn in its chat formats (those its vocabulary has)
    mtp: bool = False  # multi-token prediction modules (speculative decoding)

    # --- config.json and the modules ------------------------------------------------------------------------
    def read_config(self, raw: dict[str, Any]) -> Any:
        raise NotImplementedError

    def build(self, config: Any) -> CausalLM:
        raise NotImplementedError

    def fit_to_checkpoint(self, model: CausalLM, names: set[str]) -> None:
        """Adjust a built model to the tensors a checkpoint holds (nothing to do for most families)."""

    def unread_tensors(self, config: Any) -> set[str]:
        """Names a checkpoint may hold that the model does not read."""
        return set()

    # --- GGUF ------------------------------------------------------------------------------------------------
    def gguf_keys(self, config: Any) -> dict[str, Any]:
        """The {arch}.* keys (without the prefix) llama.cpp's loader reads."""
        raise NotImplementedError

    def gguf_tensors(self, model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
        """(GGUF name, tensor) for every tensor of the file, in llama.cpp's layouts."""
        raise NotImplementedError

    def config_from_gguf(self, f: GGUFFile) -> dict[str, Any]:
        """A GGUF's metadata as the config.json it came from (read by `read_config`)."""
        raise NotImplementedError

    def tensors_from_gguf(self, f: GGUFFile, config: Any) -> dict[str, Any]:
        """The model's tensors by Hugging Face name, as sources the loader reads (seekling/model/gguf_file.py)."""
        return renamed_from_gguf(f, self.layer_names)

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF name of a Hugging Face tensor name (model.layers.L.<x> -> blk.L.<layer_names[x]>)."""
        if hf_name in GLOBAL_NAMES:
            return GLOBAL_NAMES[hf_name]
        parts = hf_name.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in self.layer_names:
            return f"blk.{parts[2]}.{self.layer_names[parts[3]]}"
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")


def renamed_from_gguf(f: GGUFFile, layer_names: dict[str, str]) -> dict[str, GGUFTensor]:
    """The file's tensors that are plain renames, by Hugging Face name (the rest is the family's to map)."""
    back = {gg: hf for hf, gg in layer_names.items()}
    globals_back = {gg: hf for hf, gg in GLOBAL_NAMES.items()}
    out = {}
    for name, t in f.tensors.items():
        if name in globals_back:
            out[globals_back[name]] = t
            continue
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in back:
            out[f"model.layers.{parts[1]}.{back[parts[2]]}"] = t
    return out


def shape_keys(cfg: Any) -> dict[str, Any]:
    """The GGUF keys every family fills from the same config fields."""
    return {
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "block_count": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "attention.head_count": cfg.num_attention_heads,
    }


def shape_fields(f: GGUFFile) -> dict[str, Any]:
    """`shape_keys` read back as config.json fields, with what every GGUF says of its vocabulary and output."""
    vocab = f.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in f.tensors else f["vocab_size"]
    fields = {
        "max_position_embeddings": f["context_length"],
        "hidden_size": f["embedding_length"],
        "intermediate_size": f["feed_forward_length"],
        "num_hidden_layers": f["block_count"],
        "vocab_size": int(vocab),
        "num_attention_heads": f["attention.head_count"],
        "rms_norm_eps": f.get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": f.get("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in f.tensors,
    }
    for ours, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in f.metadata:
            fields[ours] = int(f.metadata[f"tokenizer.ggml.{key}_token_id"])
    return fields


def row_blocks(n_blocks: int, block_rows: int) -> list[np.ndarray]:
    """The row indices of each of n_blocks consecutive blocks of block_rows rows."""
    return [np.arange(b * block_rows, (b + 1) * block_rows) for b in range(n_blocks)]
