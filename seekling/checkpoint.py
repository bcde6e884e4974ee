"""Hugging Face checkpoint layout: config.json + safetensors (single file or shards with an index).

The state dict of `seekling.model.Transformer` already uses transformers' `DeepseekV3ForCausalLM`
names. On disk we add what DeepSeek-V3's own checkpoints carry for each MTP module — copies of the
shared embedding and output head (`model.layers.{N+k}.embed_tokens`, `.shared_head.head`) — and
drop them again on load, since in memory those are shared with the main model.
Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from seekling.atomic import save_safetensors, write_text
from seekling.config import ModelConfig

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


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index when sharded."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {}
        for name, fname in weight_map.items():
            path = directory / fname
            if not path.exists():
                raise FileNotFoundError(f"{path} is listed in {index.name} but missing")
            files[name] = path
        return files
    single = directory / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def load_pretrained(directory: str | Path, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, max_memory_gb: float | None = None) -> torch.nn.Module:
    """Load a DeepSeek-V3-format checkpoint (ours, transformers', or DeepSeek's unquantised layout), or a
    dense Qwen2/Llama one (the DeepSeek-R1-Distill releases: model_type qwen2/llama) as a DenseModel via
    `load_dense` (dtype None = its "auto" choice). Loads that would not fit in the available memory, or in
    `max_memory_gb`, are refused before any tensor is read."""
    from seekling.model import Transformer
    from seekling.model.dense import SUPPORTED_MODEL_TYPES, available_memory_bytes, format_bytes, load_dense

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    raw = json.loads((directory / "config.json").read_text()) if (directory / "config.json").exists() else None
    if raw is None:
        raise FileNotFoundError(f"{directory}/config.json not found: not a model directory")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if raw.get("model_type") in SUPPORTED_MODEL_TYPES:
        return load_dense(directory, dtype=dtype or "auto", device=device or "cpu", max_memory_gb=max_memory_gb)
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method")
        raise ValueError(f"{directory} holds a quantized checkpoint ({method}); convert it to bf16/fp32 first")
    cfg = ModelConfig.from_hf_dict(raw)
    files = weight_files(directory)
    # transformers' DeepseekV3ForCausalLM has no MTP modules and saves none while its config still
    # says num_nextn_predict_layers=1: keep only the MTP layers the checkpoint really holds.
    n = cfg.num_hidden_layers
    present = [k for k in range(cfg.num_nextn_predict_layers)
               if f"model.layers.{n + k}.eh_proj.weight" in files]
    if len(present) != cfg.num_nextn_predict_layers:
        cfg.extra["num_nextn_predict_layers_in_config"] = cfg.num_nextn_predict_layers
        cfg.num_nextn_predict_layers = len(present)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(cfg)
    # Loading peaks at the model in fp32 (to_empty) before any dtype conversion.
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    budget = available_memory_bytes(device)
    if max_memory_gb is not None:
        budget = min(budget, int(max_memory_gb * 1e9))
    if needed > budget:
        cap = f" (capped by max_memory_gb={max_memory_gb:g})" if max_memory_gb is not None else ""
        raise MemoryError(f"{directory.name} needs {format_bytes(needed)} to load, {format_bytes(budget)} "
                          f"available{cap}")
    model = model.to_empty(device=device)
    expected = model.state_dict()
    d = cfg.num_nextn_predict_layers
    shared_copies = {f"model.layers.{n + k}.{s}" for k in range(d)
                     for s in ("embed_tokens.weight", "shared_head.head.weight")}
    ignorable = ("rotary_emb.inv_freq",)
    unexpected = [k for k in files if k not in expected and k not in shared_copies and not k.endswith(ignorable)
                  and not _beyond(k, n + d)]
    if unexpected:
        raise ValueError(f"{directory}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = [k for k in expected if k not in files and k not in optional]
    if missing:
        raise ValueError(f"{directory}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(str(path), "pt", device="cpu") as f:
                for name in names:
                    t = f.get_tensor(name)
                    target = expected[name]
                    if tuple(t.shape) != tuple(target.shape):
                        raise ValueError(f"{path.name}: tensor {name} has shape {tuple(t.shape)}, "
                                         f"the config implies {tuple(target.shape)}")
                    target.copy_(t.to(target.dtype))
    # Buffers that are not stored (RoPE frequencies, load counters) are recomputed.
    _reset_buffers(model)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None:
        model = model.to(dtype)
        for moe in model.moe_layers():  # routing bias and counters stay fp32
            moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.data.float()
            moe.load.data = moe.load.data.float()
            moe.last_load.data = moe.last_load.data.float()
    return model.eval()


def _reset_buffers(model: torch.nn.Module) -> None:
    from seekling.model.mla import rope_inv_freq

    inv_freq, factor = rope_inv_freq(model.config)
    rotary = model.model.rotary_emb
    rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
    rotary.attention_factor = factor
    for moe in model.moe_layers():
        moe.load.zero_()
        moe.last_load.zero_()


def _beyond(name: str, n_layers: int) -> bool:
    """True for tensors of layers we do not build (MTP modules left out, as transformers does)."""
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= n_layers
