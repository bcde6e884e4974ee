"""Dense decoders for the released DeepSeek-R1-Distill checkpoints: `qwen2` and `llama` (HF layout).

The R1 distills (Qwen-1.5B/7B/14B/32B, Llama-8B/70B) are plain pre-norm decoders: GQA attention
with RoPE (Llama-3.1's "llama3" frequency scaling for the Llama ones), q/k/v biases for Qwen2,
RMSNorm and a SwiGLU MLP. Parameter names are exactly transformers' (`model.embed_tokens`,
`model.layers.L.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`,
`post_attention_layernorm`, `model.norm`, `lm_head`), so safetensors load by name.

    model = load_dense("DeepSeek-R1-Distill-Qwen-1.5B")      # reads config.json + safetensors
    logits = model(input_ids)                                # [B, T, V], full causal forward
    model.generation_defaults  # {"temperature": 0.6, "top_p": 0.95} -> SamplingParams(**...)
    model.eos_token_ids        # from generation_config.json (else config.json)

KV cache (standard, non-latent), contiguous per sequence, left-aligned:
    cache = model.new_cache(batch_size, max_len)   # list over layers of (k, v), each
                                                   # [B, num_key_value_heads, max_len, head_dim]
    logits = model(input_ids, position_ids, kv_cache=cache)
Sequence b owns cache slots 0, 1, 2, ... and a token at position p is written to slot p, so the
positions alone say where to write and what to attend to: the query at position p sees slots
0..p of its own row. There is no separate length tensor; a row's length is its next position.
  - prefill: input_ids [B, T] right-padded, position_ids = arange(T) per row. Padding tokens write
    slots beyond the row's real length; those slots are masked (they lie after every real query)
    and are overwritten by the row's next real tokens. Read each row's logits at its last real token.
  - decode: input_ids [B, 1], position_ids [B, 1] = each row's current length (rows may differ).
The cache tensors are updated in place; `model.model(...)` returns the final-normed hidden states
[B, T, H] instead of logits, for an engine that applies `model.lm_head` to chosen rows only.
Without a cache, the forward is causal in sequence order (position_ids default to arange(T)).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                           "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# generation_config.json keys that map onto SamplingParams (vLLM names), as vLLM reads them
GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass
class DenseConfig:
    """The subset of a Qwen2Config / LlamaConfig that the forward needs (HF field names)."""

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
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "llama3", "factor", ...}
    attention_bias: bool = False  # q/k/v biases (always on for qwen2; llama also puts one on o_proj)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, if config.json says

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture: model_type={model_type!r} "
                             f"(architectures={d.get('architectures')}); the dense loader reads "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
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
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope scaling type {rope_type!r} (default or llama3)")
        heads = d["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope if rope_type == "llama3" else None,
            attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        )


def rope_inv_freq(cfg: DenseConfig) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama-3.1's scaling when configured (transformers'
    `_compute_llama3_parameters`): long wavelengths are divided by `factor`, short ones kept,
    and the band between is interpolated smoothly."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, scale in the model dtype: the same rounding as transformers
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        # Qwen2 has biases on q/k/v only; Llama's attention_bias covers o_proj too
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size,
                                bias=bias and cfg.model_type == "llama")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:
            k_cache, v_cache = kv
            slots = positions[:, None, :, None].expand(B, self.n_kv_heads, T, self.head_dim)
            k_cache.scatter_(2, slots, k)
            v_cache.scatter_(2, slots, v)
            S = int(positions.max()) + 1  # attend over the used prefix of the cache only
            k, v = k_cache[:, :, :S], v_cache[:, :, :S]
            if B == 1 and T == 1:
                mask = None  # one query at the last slot sees everything before it
            else:
                mask = (torch.arange(S, device=x.device) <= positions[:, :, None])[:, None]  # [B,1,T,S]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, positions, kv):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class DenseBody(nn.Module):
    """`model.*` of the HF layout: embeddings, blocks, final norm. Returns hidden states."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            if kv_cache is not None:
                raise ValueError("position_ids are required with a kv_cache (they say which slots to write)")
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if kv_cache is not None and int(position_ids.max()) >= kv_cache[0][0].shape[2]:
            raise ValueError(f"position {int(position_ids.max())} is beyond the kv_cache length "
                             f"{kv_cache[0][0].shape[2]}: allocate a longer cache with new_cache()")
        x = self.embed_tokens(input_ids)
        # angles in fp32 (as transformers does), then cos/sin in the model dtype, broadcast over heads
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, position_ids, None if kv_cache is None else kv_cache[i])
        return self.norm(x)


class DenseModel(nn.Module):
    """Qwen2ForCausalLM / LlamaForCausalLM with transformers' parameter names."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.config = cfg
        self.model = DenseBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.generation_defaults: dict[str, Any] = {}  # filled by load_dense from generation_config.json
        self.eos_token_ids: list[int] = []

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, T, V] (the last `logits_to_keep` positions only when > 0)."""
        h = self.model(input_ids, position_ids, kv_cache)
        return self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed (k, v) per layer, each [batch_size, num_key_value_heads, max_len, head_dim]."""
        cfg, ref = self.config, self.model.norm.weight
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        dtype, device = dtype or ref.dtype, device or ref.device
        zeros = lambda: torch.zeros(shape, dtype=dtype, device=device)
        return [(zeros(), zeros()) for _ in range(cfg.num_hidden_layers)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once


# ----------------------------------------------------------------------------- loading


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """{name: {"dtype": "BF16", "shape": [...]}} from a file's JSON header, without reading tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def checkpoint_tensors(path: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every tensor of a model directory: {name: (file, header entry)}, single file or sharded."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif single.exists():
        files = [single.name]
    else:
        others = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {others}: convert them to safetensors first)" if others else ""
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")
    tensors = {}
    for name in files:
        file = path / name
        if not file.exists():
            raise FileNotFoundError(f"missing weight file {file} (listed in {index.name})")
        for key, entry in read_safetensors_header(file).items():
            tensors[key] = (file, entry)
    return tensors


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:  # psutil is optional: Linux always has /proc/meminfo
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise


def read_generation_config(path: Path) -> tuple[dict[str, Any], list[int]]:
    """(SamplingParams defaults, eos token ids) from generation_config.json, as vLLM reads it."""
    file = path / "generation_config.json"
    gen = json.loads(file.read_text()) if file.exists() else {}
    defaults = {ours: gen[theirs] for theirs, ours in GENERATION_KEYS.items() if gen.get(theirs) is not None}
    if gen.get("do_sample") is False:
        defaults["temperature"] = 0.0  # the checkpoint asks for greedy decoding
    eos = gen.get("eos_token_id")
    if eos is None:
        config = json.loads((path / "config.json").read_text())
        eos = config.get("eos_token_id")
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return defaults, eos_ids


def checkpoint_dtype(cfg: DenseConfig, tensors: dict[str, tuple[Path, dict[str, Any]]]) -> torch.dtype:
    """The dtype the weights are stored in: config.json's torch_dtype, else the headers' most common."""
    if cfg.torch_dtype in DTYPES:
        return DTYPES[cfg.torch_dtype]
    stored = [entry["dtype"] for _, entry in tensors.values()]
    most_common = max(set(stored), key=stored.count)
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(most_common, torch.float32)


def bytes_needed(tensors: dict[str, tuple[Path, dict[str, Any]]], names: Iterable[str],
                 dtype: torch.dtype) -> int:
    """Bytes of the named tensors once loaded, floating-point ones converted to `dtype`."""
    total = 0
    for name in names:
        entry = tensors[name][1]
        is_float = entry["dtype"] in FLOAT_SAFETENSORS_DTYPES
        size = dtype.itemsize if is_float else SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
        total += math.prod(entry["shape"]) * size
    return total


def format_bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def load_dense(path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               max_memory_gb: float | None = None) -> DenseModel:
    """Load a qwen2/llama checkpoint directory (config.json + safetensors) into a DenseModel.

    dtype "auto": on CPU float32 when it fits in memory (bf16/fp16 matmuls are emulated and far slower
    there), else the checkpoint's own dtype; on an accelerator the checkpoint's dtype. The bytes needed
    are summed from the safetensors headers before anything is read, and the load is refused when they
    exceed the available memory (or `max_memory_gb`). Tensors are copied one at a time into a model
    allocated with `to_empty`, so the peak is the model plus one tensor.
    """
    path, device = Path(path), torch.device(device)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"missing {config_file}")
    cfg = DenseConfig.from_dict(json.loads(config_file.read_text()))
    tensors = checkpoint_tensors(path)

    with torch.device("meta"):
        model = DenseModel(cfg)
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")  # shares embed_tokens; a saved copy is ignored
    unexpected = [k for k in tensors if k not in expected and "rotary_emb.inv_freq" not in k
                  and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise KeyError(f"{len(missing)} tensor(s) missing from the checkpoint in {path}: {missing[:5]}")
    if unexpected:
        raise KeyError(f"{len(unexpected)} unexpected tensor(s) in {path} for model_type={cfg.model_type}: "
                       f"{unexpected[:5]}")
    for name, p in expected.items():
        shape = list(tensors[name][1]["shape"])
        if shape != list(p.shape):
            raise ValueError(f"tensor {name} has shape {shape} in {tensors[name][0].name}, "
                             f"expected {list(p.shape)} from config.json")

    budget = available_memory_bytes(device)
    if max_memory_gb is not None:
        budget = min(budget, int(max_memory_gb * 1e9))
    if dtype == "auto":
        fp32_fits = device.type == "cpu" and bytes_needed(tensors, expected, torch.float32) <= budget
        target = torch.float32 if fp32_fits else checkpoint_dtype(cfg, tensors)
    elif isinstance(dtype, torch.dtype):
        target = dtype
    elif dtype in DTYPES:
        target = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    needed = bytes_needed(tensors, expected, target)
    if needed > budget:
        hint = "try --dtype bfloat16" if target == torch.float32 else "try a smaller model"
        cap = f" (capped by max_memory_gb={max_memory_gb:g})" if max_memory_gb is not None else ""
        name = str(target).removeprefix("torch.")
        raise MemoryError(f"{path.name} needs {format_bytes(needed)} in {name}, "
                          f"{format_bytes(budget)} available{cap}; {hint}")

    model = model.to(target).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty may have split the tie
    model.model.inv_freq = rope_inv_freq(cfg).to(device)  # buffers come out of to_empty uninitialised
    params = dict(model.state_dict(keep_vars=True))
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(tensors[name][0], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    params[name].copy_(f.get_tensor(name))  # converts dtype / moves device as it copies
    model.generation_defaults, model.eos_token_ids = read_generation_config(path)
    return model.eval()
