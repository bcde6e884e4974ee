"""Hugging Face checkpoint layout: config.json + safetensors (single file or shards with an index).

The state dict of `seekling.model.Transformer` already uses transformers' `DeepseekV3ForCausalLM`
names. On disk we add what DeepSeek-V3's own checkpoints carry for each MTP module — copies of the
shared embedding and output head (`model.layers.{N+k}.embed_tokens`, `.shared_head.head`) — and
drop them again on load, since in memory those are shared with the main model.
Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint behind. Reading: `checkpoint_tensors` lists what a directory holds from the
safetensors headers alone; seekling/model/load.py builds the models from it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seekling.atomic import save_safetensors, write_text
from seekling.model.config import ModelConfig

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _disk_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg: ModelConfig = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        sd[f"{prefix}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        sd[f"{prefix}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return sd


def save_pretrained(model: torch.nn.Module, directory: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write config.json, generation_config.json and the weights (sharded above max_shard_bytes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    sd = _disk_state(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(sd):
        t = sd[name]
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    index_path = directory / "model.safetensors.index.json"
    if len(shards) == 1:
        save_safetensors(directory / "model.safetensors", shards[0])
        index_path.unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(directory / fname, shard)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in sd.values())
        write_text(index_path, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
        (directory / "model.safetensors").unlink(missing_ok=True)
    cfg.save(directory)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
           "temperature": 0.6, "top_p": 0.95}
    write_text(directory / "generation_config.json", json.dumps(gen, indent=2))


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# generation_config.json keys that map onto SamplingParams (vLLM names), as vLLM reads them
GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lies in a safetensors file: read it (or some of its rows) without mapping the file."""

    file: Path
    dtype: str  # safetensors' name: "F32", "BF16", ...
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("F", "BF"))

    def read(self, rows: slice | None = None) -> torch.Tensor:
        """The tensor (or rows [start, stop) of its first dimension) as stored. Plain reads, no mmap: a
        loader's resident memory is then what it keeps, not every page of the file it touched."""
        start, stop = (0, self.shape[0]) if rows is None else (rows.start, rows.stop)
        row_bytes = self.nbytes // max(1, self.shape[0]) if self.shape else self.nbytes
        count = (stop - start) * row_bytes if self.shape else self.nbytes
        buf = bytearray(count)
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.offset + start * row_bytes)
            view, done = memoryview(buf), 0
            while done < count:
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{self.file}: truncated tensor data (wanted {count} bytes)")
                done += n
        shape = ((stop - start), *self.shape[1:]) if self.shape else ()
        if count == 0:
            return torch.empty(shape, dtype=SAFETENSORS_DTYPES[self.dtype])
        return torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[self.dtype]).view(shape)


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """A safetensors file's JSON header ({name: {"dtype", "shape", "data_offsets"}}) and where its data begins;
    ValueError, naming the file, for one that is not safetensors or is cut short (every tensor is checked to
    lie within the file, so a truncated download is found before any weight is read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise ValueError(f"{path} is not a safetensors file (or it is cut short: {size} bytes)")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            ends = [e["data_offsets"][1] for e in header.values()]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"{path} has a broken safetensors header: {e}") from e
    if 8 + n + max(ends, default=0) > size:
        raise ValueError(f"{path} is truncated: its tensors need {8 + n + max(ends)} bytes, the file has {size}")
    return header, 8 + n


def checkpoint_tensors(directory: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of a model directory, single file or sharded (by the index), from the headers alone."""
    directory = Path(directory)
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif single.exists():
        files = [single.name]
    else:
        others = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {others}: convert them to safetensors first)" if others else ""
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}{hint}")
    tensors = {}
    for name in files:
        file = directory / name
        if not file.exists():
            raise FileNotFoundError(f"{file} is listed in {index.name} but missing")
        header, data_start = read_header(file)
        for key, e in header.items():
            begin, end = e["data_offsets"]
            tensors[key] = StoredTensor(file, e["dtype"], tuple(e["shape"]), data_start + begin, end - begin)
    return tensors


def read_generation_config(directory: str | Path) -> tuple[dict[str, Any], list[int]]:
    """(SamplingParams defaults, eos token ids) from generation_config.json, as vLLM reads it."""
    directory = Path(directory)
    file = directory / "generation_config.json"
    gen = json.loads(file.read_text()) if file.exists() else {}
    defaults = {ours: gen[theirs] for theirs, ours in GENERATION_KEYS.items() if gen.get(theirs) is not None}
    if gen.get("do_sample") is False:
        defaults["temperature"] = 0.0  # the checkpoint asks for greedy decoding
    eos = gen.get("eos_token_id")
    if eos is None and (directory / "config.json").exists():
        eos = json.loads((directory / "config.json").read_text()).get("eos_token_id")
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return defaults, eos_ids
