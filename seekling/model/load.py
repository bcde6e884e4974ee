"""Loading a model: a Hugging Face directory of any family seekling runs (seekling/model/families/: DeepSeek-V3,
ours, transformers' or DeepSeek's unquantised layout; DeepSeek-V2; Qwen2, Qwen3, Llama), a GGUF file, or a
model pulled by Ollama (`ollama:NAME[:TAG]`, seekling/sources.py).

    model = load_pretrained("runs/speedrun/rl")                       # fp32 on the CPU
    model = load_pretrained("DeepSeek-R1-Distill-Qwen-1.5B", quantize="int8")
    model = load_pretrained("ollama:deepseek-r1:8b")                  # a GGUF keeps its own bits

The source gives a `Checkpoint`: its family (config.json's model_type, or the GGUF's architecture), the config,
and the tensors by Hugging Face name as sources that read themselves (safetensors headers: checkpoint.py; GGUF
tensors, with the layouts llama.cpp's converter changed undone: gguf_file.py and the family). Everything after
that is the same for both. A GGUF whose weights are quantised loads with int8 weights (dequantised, then
re-quantised per row as it streams in) unless a `dtype` asks for float ones.

Memory is what decides whether a laptop can run a model, so the load is planned from the safetensors
headers before any tensor is read (refused when it would not fit, or exceed `max_memory_gb`), and tensors
are read with plain file reads (no mmap: resident memory is what the model keeps, not every page touched):
  - float: the model is allocated once at the target dtype, `prepare` lays out its fused projections, and
    each tensor is read straight into its parameter (a view of the fused storage): the peak is the model
    plus one tensor;
  - int8: layer by layer: a layer is materialised in float, read, quantised by its own `prepare`, and its
    float weights freed before the next; the embedding and output head are quantised in row chunks as they
    are read. No float copy of a quantised weight is ever kept, and the peak is the int8 model plus one layer
    in float (plus a chunk of the embedding).
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seekling.checkpoint import DTYPES, StoredTensor, checkpoint_tensors, read_generation_config
from seekling.model.families import Family, family, gguf_family
from seekling.model.gguf_file import FLOAT_TYPES, GGUFFile, GGUFTensor
from seekling.model.layers import CausalLM, free_parameters
from seekling.model.quant import QBLOCK, TILE, Int8Weight, concat, quantize
from seekling.sources import is_gguf, resolve_model

QUANTIZE = ("int8",)
EMBED_CHUNK_ROWS = 8192  # rows of an embedding / output head read and quantised at a time


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): its allocator returns memory its own way
        return None


def _allocate_big_tensors_apart() -> None:
    """glibc serves big allocations from mmap until a free raises its threshold (up to 32 MB), after which
    freed float weights stay in the heap and resident memory grows layer by layer during a quantising load
    (measured: 1.7 GB held for a 0.5 GB int8 model). A fixed threshold keeps every tensor over 1 MB its own
    mapping, returned to the system when freed."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them otherwise): after a quantising load, and
    after parsing a large tokenizer.json (a 152k-vocabulary one leaves ~60 MB of freed parse buffers)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("cannot tell the available memory (no MemAvailable in /proc/meminfo)")


def format_bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)} (or auto)")
    return DTYPES[dtype]


@dataclass
class Checkpoint:
    """What a model source holds, whatever its format."""

    name: str  # the path, for messages
    family: Family
    config: Any
    stored: dict[str, Any]  # Hugging Face name -> a source with shape, dtype, is_float, read(rows)
    generation: tuple[dict[str, Any], list[int]]  # (SamplingParams defaults, eos ids)
    quantized: bool = False  # a GGUF whose matmul weights are quantised


def open_directory(directory: Path) -> Checkpoint:
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}/config.json not found: not a model directory")
    try:
        raw = json.loads((directory / "config.json").read_text())
    except ValueError as e:
        raise ValueError(f"{directory}/config.json is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{directory}/config.json is not a JSON object")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method")
        raise ValueError(f"{directory} holds a quantized checkpoint ({method}); use the bf16/fp32 release")
    fam = family(raw.get("model_type", "deepseek_v3"), raw.get("architectures"))
    try:
        config = fam.read_config(raw)
    except KeyError as e:
        raise ValueError(f"{directory}/config.json has no {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory}/config.json: {e}") from e
    return Checkpoint(str(directory), fam, config, checkpoint_tensors(directory), read_generation_config(directory))


def open_gguf(path: Path) -> Checkpoint:
    f = GGUFFile(path)
    f.check_types()
    raw = gguf_family(f).config_from_gguf(f)
    fam = family(raw["model_type"])
    config = fam.read_config(raw)
    stored = fam.tensors_from_gguf(f, config)
    weights = [t for t in stored.values() if isinstance(t, GGUFTensor) and len(t.shape) >= 2]
    quantized = sum(t.ggml_type not in FLOAT_TYPES for t in weights) * 2 > len(weights)
    return Checkpoint(str(path), fam, config, stored, f.generation_config(), quantized)


def open_checkpoint(source: str | Path) -> Checkpoint:
    path = resolve_model(source)
    return open_gguf(path) if is_gguf(path) else open_directory(path)


def _expected(model: CausalLM, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The model's state (parameters and stored buffers) by name, checked against the files' names and shapes."""
    stored, where = ckpt.stored, ckpt.name
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if tied:
        expected.pop("lm_head.weight")  # shares embed_tokens; a saved copy is ignored
    skip = ckpt.family.unread_tensors(model.config) | ({"lm_head.weight"} if tied else set())
    n_layers = len(model.model.layers)

    def ignorable(name: str) -> bool:
        parts = name.split(".")
        layer = int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else -1
        return name in skip or name.endswith("rotary_emb.inv_freq") or layer >= n_layers  # MTP layers not built

    unexpected = [k for k in stored if k not in expected and not ignorable(k)]
    if unexpected:
        raise ValueError(f"{where}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         f"for {type(model).__name__}")
    missing = [k for k in expected if k not in stored]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, t in expected.items():
        if tuple(stored[name].shape) != tuple(t.shape):
            raise ValueError(f"tensor {name} has shape {list(stored[name].shape)} in {stored[name].file.name}, "
                             f"expected {list(t.shape)} from the config")
    return expected


def _quantized_bytes(name: str, t: torch.Tensor, itemsize: int) -> int:
    """What a tensor costs after int8 `prepare`: 1 byte per weight (rows padded to 32) + a scale per row for
    the matmul weights; norms, routers, kv_b_proj (read by per-head einsums) and buffers keep their float size."""
    float_kept = t.dim() < 2 or name.endswith(("gate.weight", "kv_b_proj.weight"))
    if float_kept:
        return t.numel() * itemsize
    rows = t.numel() // t.shape[-1]
    return -(-rows // TILE) * TILE * -(-t.shape[-1] // QBLOCK) * QBLOCK + 4 * rows


def _bytes_needed(expected: dict[str, torch.Tensor], dtype: torch.dtype, quantize_to: str | None) -> int:
    size = lambda t: dtype.itemsize if t.is_floating_point() else t.element_size()
    if quantize_to:
        return sum(_quantized_bytes(n, t, size(t)) for n, t in expected.items())
    return sum(t.numel() * size(t) for t in expected.values())


def _budget(device: torch.device, max_memory_gb: float | None) -> int:
    budget = available_memory_bytes(device)
    return budget if max_memory_gb is None else min(budget, int(max_memory_gb * 1e9))


def _check_memory(directory: Path, needed: int, budget: int, dtype: torch.dtype, quantize_to: str | None,
                  max_memory_gb: float | None) -> None:
    if needed <= budget:
        return
    precision = quantize_to or str(dtype).removeprefix("torch.")
    hint = {"float32": "try --dtype bfloat16 or --quantize int8", "int8": "try a smaller model"}.get(
        precision, "try --quantize int8")
    cap = f" (capped by max_memory_gb={max_memory_gb:g})" if max_memory_gb is not None else ""
    raise MemoryError(f"{directory.name} needs {format_bytes(needed)} in {precision}, "
                      f"{format_bytes(budget)} available{cap}; {hint}")


def _auto_dtype(stored: dict[str, StoredTensor], device: torch.device, fp32_fits: bool) -> torch.dtype:
    """On the CPU fp32 when it fits (bf16/fp16 matmuls are emulated and far slower there), else the stored
    dtype; on an accelerator the stored dtype."""
    if device.type == "cpu" and fp32_fits:
        return torch.float32
    kinds = [t.dtype for t in stored.values() if t.is_float]
    most = max(set(kinds), key=kinds.count) if kinds else "F32"
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(most, torch.float32)


def _materialize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Allocate a meta module's float parameters at `dtype` (routing biases and counters stay fp32)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                     requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_meta:
                sub._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)


def _read_into(names: list[str], expected: dict[str, torch.Tensor], stored: dict[str, StoredTensor]) -> None:
    with torch.no_grad():
        for name in names:
            expected[name].copy_(stored[name].read())  # converts the dtype, moves the device


def _quantize_streamed(t: StoredTensor) -> Int8Weight:
    """An embedding / output head quantised in row chunks as it is read (never whole in float)."""
    rows = t.shape[0]
    chunks = [slice(a, min(a + EMBED_CHUNK_ROWS, rows)) for a in range(0, rows, EMBED_CHUNK_ROWS)]
    return concat([quantize(t.read(part)) for part in chunks])


def _relayer(name: str) -> str:
    """The group a tensor loads with: its layer ("model.layers.3"), or "" for the embedding, norms, head."""
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else ""


def load_pretrained(source: str | Path, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, max_memory_gb: float | None = None,
                    quantize: str | None = None) -> CausalLM:
    """Load a model directory, GGUF file or `ollama:NAME[:TAG]` (see the module docstring). dtype None / "auto":
    fp32 on the CPU, else the checkpoint's. quantize="int8": int8 weights for inference (the model is then not
    trainable or savable); a GGUF with quantised weights loads so unless a dtype asks for float weights."""
    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"unknown quantize={quantize!r}: {', '.join(QUANTIZE)} (or None)")
    ckpt = open_checkpoint(source)
    if ckpt.quantized and quantize is None and dtype is None:  # a quantised GGUF keeps 8 bits unless asked
        quantize = "int8"
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = ckpt.family.build(ckpt.config)
    ckpt.family.fit_to_checkpoint(model, set(ckpt.stored))
    stored = ckpt.stored
    expected = _expected(model, ckpt)
    budget = _budget(device, max_memory_gb)
    _allocate_big_tensors_apart()
    target = _dtype(None if dtype == "auto" else dtype) or _auto_dtype(
        stored, device, _bytes_needed(expected, torch.float32, quantize) <= budget)
    _check_memory(Path(ckpt.name), _bytes_needed(expected, target, quantize), budget, target, quantize,
                  max_memory_gb)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if quantize is None:
        _materialize(model, device, target)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        expected = _expected(model, ckpt)  # the allocated tensors, by the same names
        model.reset_buffers(device)
        model.prepare()  # fused layouts first, so every tensor is read straight into its final place
        _read_into(list(expected), expected, stored)
    else:
        _load_quantized(model, stored, device, target, quantize)
    model.generation_defaults, eos = ckpt.generation
    model.eos_token_ids = eos or model.eos_token_ids
    release_freed_memory()
    return model.eval()


def _load_quantized(model: CausalLM, stored: dict[str, StoredTensor], device: torch.device, dtype: torch.dtype,
                    quantize_to: str) -> None:
    names = [n for n in model.state_dict(keep_vars=True) if n in stored]
    for i, layer in enumerate(model.model.layers):
        _materialize(layer, device, dtype)
        prefix = f"model.layers.{i}."
        state = {prefix + k: v for k, v in layer.state_dict(keep_vars=True).items()}
        _read_into([n for n in names if _relayer(n) == prefix[:-1]], state, stored)
        with torch.no_grad():
            free_parameters(layer, layer.prepare(quantize_to))
    embed_w = _quantize_streamed(stored["model.embed_tokens.weight"])
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    head_w = embed_w if tied else _quantize_streamed(stored["lm_head.weight"])
    rest = [n for n in names if _relayer(n) == "" and n not in ("lm_head.weight", "model.embed_tokens.weight")]
    for n in rest:  # the final norm
        _materialize(model.get_submodule(n.rpartition(".")[0]), device, dtype)
    _read_into(rest, dict(model.state_dict(keep_vars=True)), stored)
    model.reset_buffers(device)
    free_parameters(model, model.prepare_head(quantize_to, head_w, embed_w))
    model.quantized = quantize_to
