"""Loading a model: a Hugging Face directory of any family seekling runs (seekling/model/families/: DeepSeek-V3,
ours, transformers' or DeepSeek's unquantised layout; DeepSeek-V2; Qwen2, Qwen3, Llama), a GGUF file, or a
model pulled by Ollama (`ollama:NAME[:TAG]`, seekling/sources.py).

    model = load_pretrained("runs/speedrun/rl")                       # fp32 on the CPU
    model = load_pretrained("DeepSeek-R1-Distill-Qwen-1.5B", quantize="int8")
    model = load_pretrained("ollama:deepseek-r1:8b")                  # a GGUF keeps its own bits

The source gives a `Checkpoint`: its family (config.json's model_type, or the GGUF's architecture), the config,
and the tensors by Hugging Face name as sources that read themselves (safetensors headers: checkpoint.py; GGUF
tensors, with the layouts llama.cpp's converter changed undone: gguf_file.py and the family). Everything after
that is the same for both. A GGUF whose weights are quantised loads them in seekling's int8 / int4 layouts
(`quant.from_ggml`'s conversions, streamed) unless a `dtype` or `quantize` asks otherwise.

Memory is what decides whether a laptop can run a model, so the load is planned from the safetensors
headers before any tensor is read (refused when it would not fit, or exceed `max_memory_gb`), and tensors
are read with plain file reads (no mmap: resident memory is what the model keeps, not every page touched):
  - float: the model is allocated once at the target dtype, `prepare` lays out its fused projections, and
    each tensor is read straight into its parameter (a view of the fused storage): the peak is the model
    plus one tensor;
  - int8 / int4: layer by layer, the layer's matmul weights stay unallocated (meta) and carry where they lie
    in the file; its own `prepare` quantises them, and `quantize` reads each a chunk of rows at a time into
    its slot of the quantised weight (routed experts one at a time into their stack). Only the small float
    tensors (norms, biases, routers, MLA's kv_b_proj) are allocated. The peak is the quantised model plus one
    chunk (16 MB of fp32), whatever the size of a layer. A GGUF's quantised tensors keep their own bits
    ("gguf": Q4_0/Q4_1/Q4_K become int4, the others int8; Q4_K, Q8_0 and Q5_0 exactly, from their bytes).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seekling.checkpoint import DTYPES, StoredTensor, checkpoint_tensors, read_generation_config
from seekling.model.families import Family, family, gguf_family
from seekling.model.gguf_file import FLOAT_TYPES, GGUFFile, GGUFTensor
from seekling.model.layers import CausalLM, free_parameters
from seekling.model.quant import KINDS, head_kind, layer_mode, natural_kind, quantized_nbytes, use_kernels, weight_kind
from seekling.sources import is_gguf, resolve_model

QUANTIZE = KINDS


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


FLOAT_KEPT = ("gate.weight", "kv_b_proj.weight")  # read in float by `infer` (routers; MLA's per-head bmm)


def _planned_kind(name: str, quantize_to: str, head: str, n_layers: int, stored: Any) -> str:
    """The kind `prepare(quantize_to)` gives the weight `name` (the same policy: `layer_mode`, `weight_kind`,
    and for "gguf" the stored tensor's own, `natural_kind`)."""
    if quantize_to == "gguf":
        return natural_kind(stored)
    if name == head:
        return head_kind(quantize_to)
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return weight_kind(quantize_to, "embed")
    mode = layer_mode(quantize_to, int(parts[2]), n_layers)
    role = "expert_down" if ".experts." in name and name.endswith("down_proj.weight") else \
        "down" if name.endswith("down_proj.weight") else ""
    return weight_kind(mode, role)


def _bytes_needed(expected: dict[str, torch.Tensor], stored: dict[str, Any], dtype: torch.dtype,
                  quantize_to: str | None) -> int:
    """The model's bytes after `prepare(quantize_to)`, from shapes alone: matmul weights in their quantised
    layouts; norms, routers, kv_b_proj and buffers at their float size."""
    size = lambda t: dtype.itemsize if t.is_floating_point() else t.element_size()
    if not quantize_to:
        return sum(t.numel() * size(t) for t in expected.values())
    head = "lm_head.weight" if "lm_head.weight" in expected else "model.embed_tokens.weight"  # tied: one
    n_layers = 1 + max((int(n.split(".")[2]) for n in expected if n.startswith("model.layers.")), default=0)
    return sum(t.numel() * size(t) if t.dim() < 2 or n.endswith(FLOAT_KEPT) else
               quantized_nbytes(tuple(t.shape), _planned_kind(n, quantize_to, head, n_layers, stored.get(n)))
               for n, t in expected.items())


def _budget(device: torch.device, max_memory_gb: float | None) -> int:
    budget = available_memory_bytes(device)
    return budget if max_memory_gb is None else min(budget, int(max_memory_gb * 1e9))


def _check_memory(directory: Path, expected: dict[str, torch.Tensor], stored: dict[str, Any], dtype: torch.dtype,
                  quantize_to: str | None, budget: int, max_memory_gb: float | None) -> None:
    """Refuse, before any weight is read, a load whose weights would not fit the budget, saying what each
    precision would need and which fit."""
    needed = _bytes_needed(expected, stored, dtype, quantize_to)
    if needed <= budget:
        return
    precision = quantize_to or str(dtype).removeprefix("torch.")
    options = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (dtype, "int8"),
               "int4": (dtype, "int4")}
    sizes = {name: _bytes_needed(expected, stored, *option) for name, option in options.items()
             if name != precision}
    fits = [name for name, n in sizes.items() if n <= budget]  # the most precise first
    hint = ("no precision fits: try a smaller model" if not fits else
            f"--quantize {fits[0]} would fit" if fits[0] in KINDS else f"--dtype {fits[0]} would fit")
    others = ", ".join(f"{name} {format_bytes(n)}" for name, n in sizes.items())
    cap = f" (capped by max_memory_gb={max_memory_gb:g})" if max_memory_gb is not None else ""
    raise MemoryError(f"{directory.name} needs {format_bytes(needed)} in {precision}, {format_bytes(budget)} "
                      f"available{cap}; {hint} (weights in {others})")


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


def _relayer(name: str) -> str:
    """The group a tensor loads with: its layer ("model.layers.3"), or "" for the embedding, norms, head."""
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else ""


def load_pretrained(source: str | Path, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, max_memory_gb: float | None = None,
                    quantize: str | None = None) -> CausalLM:
    """Load a model directory, GGUF file or `ollama:NAME[:TAG]` (see the module docstring). dtype None / "auto":
    fp32 on the CPU, else the checkpoint's. quantize="int8" / "int4": quantised weights for inference
    (seekling/model/quant.py; the model is then not trainable or savable); a GGUF with quantised weights keeps
    their bits unless a dtype or quantize asks otherwise."""
    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"unknown quantize={quantize!r}: {', '.join(QUANTIZE)} (or None)")
    ckpt = open_checkpoint(source)
    if ckpt.quantized and quantize is None and dtype is None:  # a quantised GGUF keeps its own bits unless asked
        quantize = "gguf"
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = ckpt.family.build(ckpt.config)
    ckpt.family.fit_to_checkpoint(model, set(ckpt.stored))
    stored = ckpt.stored
    expected = _expected(model, ckpt)
    budget = _budget(device, max_memory_gb)
    _allocate_big_tensors_apart()
    target = _dtype(None if dtype == "auto" else dtype) or _auto_dtype(
        stored, device, _bytes_needed(expected, stored, torch.float32, quantize) <= budget)
    _check_memory(Path(ckpt.name), expected, stored, target, quantize, budget, max_memory_gb)
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
        use_kernels(device)  # quantise with them (one C++ pass a row), not with the torch reference
        _load_quantized(model, stored, device, target, quantize)
    model.generation_defaults, eos = ckpt.generation
    model.eos_token_ids = eos or model.eos_token_ids
    release_freed_memory()
    return model.eval()


def _load_quantized(model: CausalLM, stored: dict[str, StoredTensor], device: torch.device, dtype: torch.dtype,
                    quantize_to: str) -> None:
    """Layer by layer, then the embedding and head: every matmul weight is quantised as it is read (see the
    module docstring)."""
    n = len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        mode = layer_mode(quantize_to, i, n)
        _prepare_streamed(layer, f"model.layers.{i}.", stored, device, dtype, lambda m, mode=mode: m.prepare(mode))
    _prepare_streamed(model, "", stored, device, dtype, lambda m: m.prepare_head(quantize_to), skip="model.layers.")
    model.reset_buffers(device)
    model.quantized = quantize_to


def _prepare_streamed(module: nn.Module, prefix: str, stored: dict[str, StoredTensor], device: torch.device,
                      dtype: torch.dtype, prepare: Callable[[nn.Module], list[nn.Parameter]],
                      skip: str | None = None) -> None:
    """Allocate and read the module's small tensors (below 2 dims) and those kept in float (FLOAT_KEPT), leave
    its matmul weights on meta with their `stored` location for `prepare` to quantise from the file, then
    read whatever `prepare` did not take and free what it replaced."""
    state = {prefix + k: v for k, v in module.state_dict(keep_vars=True).items()
             if skip is None or not k.startswith(skip)}
    lazy = {n: t for n, t in state.items() if t.dim() >= 2 and not n.endswith(FLOAT_KEPT) and n in stored}
    eager = [n for n in state if n not in lazy and n in stored]
    buffers = [b for name, b in module.named_buffers() if skip is None or not name.startswith(skip)]
    _allocate(module, [state[n] for n in eager] + buffers, device, dtype, skip)  # unstored buffers: zeros
    state = {prefix + k: v for k, v in module.state_dict(keep_vars=True).items()}  # the allocated tensors
    _read_into(eager, state, stored)
    for n, t in lazy.items():
        t.stored = stored[n]
    with torch.no_grad():
        replaced = prepare(module)
    taken = {id(p) for p in replaced}
    left = [n for n, t in lazy.items() if id(t) not in taken]
    if left:  # a 2-D weight this family's `prepare` reads in float
        _allocate(module, [lazy[n] for n in left], device, dtype, skip)
        _read_into(left, {prefix + k: v for k, v in module.state_dict(keep_vars=True).items()}, stored)
    free_parameters(module, replaced)


def _allocate(module: nn.Module, tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype,
              skip: str | None) -> None:
    """`_materialize` for just these meta tensors of the module (by identity; outside `skip`'s submodules)."""
    wanted = {id(t) for t in tensors}
    for name, sub in module.named_modules():
        if skip is not None and (name + ".").startswith(skip):
            continue
        for key, p in list(sub._parameters.items()):
            if p is not None and id(p) in wanted:
                sub._parameters[key] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                    requires_grad=p.requires_grad)
        for key, b in list(sub._buffers.items()):
            if b is not None and id(b) in wanted:
                sub._buffers[key] = torch.zeros(b.shape, dtype=b.dtype, device=device)
