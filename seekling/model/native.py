"""The DeepSeek-V3 inference step in C++ (native.cpp): the same maths as `Transformer.infer` / `infer_mtp`, over
raw loops, plus the sampler and a loop of k decode steps, so a decode step costs the weights it reads and no
Python per token.

`NativeModel(model, kv)` holds the model's own prepared tensors (no copy), so in-place updates of the weights
(an optimizer step) are seen by the next call without rebuilding anything; a new `prepare` (after `.to()` or a
dtype change) is noticed and the tensors are taken again. `unsupported(model)` says why a model cannot run here
(the engine then runs the Python step, which computes the same thing more slowly): dense families, int8/int4 or
non-fp32 weights, a device other than the CPU, or a routing variant this file does not implement.

The C++ source is compiled on first use with torch's cpp_extension (~1 minute once; cached under
~/.cache/torch_extensions, keyed by the CPU and the source's hash). Without a C++ compiler the engine logs why
and runs the Python step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any

import torch

from seekling.atomic import write_bytes

log = logging.getLogger("seekling.native")
_SOURCE = Path(__file__).with_name("native.cpp")
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast"]
_state: dict[str, Any] = {"module": None, "error": None}
_lock = threading.Lock()
MAX_EXPERTS, MAX_GROUPS = 512, 64  # the C++ router's fixed arrays


def _build_name(source: bytes) -> str:
    """Named by the CPU (-march=native) and the source's hash, so a shared cache never hands one machine's
    binary to another CPU and an edited source rebuilds."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    cpu = hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]
    return f"seekling_native_{cpu}_{hashlib.sha1(source + ' '.join(_CFLAGS).encode()).hexdigest()[:8]}"


def load_native() -> Any | None:
    """The compiled extension (built the first time), or None when it cannot be built (the reason is logged once
    and kept in `build_error()`). Thread-safe."""
    with _lock:
        if _state["module"] is None and _state["error"] is None:
            try:
                from torch.utils.cpp_extension import load

                source = _SOURCE.read_bytes()
                name = _build_name(source)
                cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                copy = cache / "seekling" / name / "native.cpp"  # a fixed path: checkouts share one build
                if not copy.exists() or copy.read_bytes() != source:
                    write_bytes(copy, source)
                _state["module"] = load(name=name, sources=[str(copy)], extra_cflags=_CFLAGS, verbose=False)
            except Exception as e:  # no compiler, no headers, an unsupported platform
                _state["error"] = f"{type(e).__name__}: {e}"
                log.warning("seekling's C++ decode step could not be built (%s); decoding runs the Python step",
                            _state["error"])
        return _state["module"]


def build_error() -> str | None:
    return _state["error"]


def unsupported(model: torch.nn.Module) -> str | None:
    """Why `NativeModel` cannot run this model (None: it can)."""
    from seekling.model.model import Transformer  # model.py imports nothing from here

    if not isinstance(model, Transformer):
        return f"{type(model).__name__} runs the Python step (the C++ step is DeepSeek-V3's)"
    if model.quantized is not None:
        return f"{model.quantized} weights run the Python step"
    weight = model.model.norm.weight
    if weight.dtype != torch.float32 or model.lm_head.weight.dtype != torch.float32:
        return f"{weight.dtype} weights run the Python step (the C++ step is fp32)"
    if weight.device.type != "cpu":
        return f"the C++ step runs on the CPU, the model is on {weight.device}"
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "gate"):
            why = _unsupported_routing(mlp.gate)
            if why:
                return why
        elif mlp.b13 is not None or mlp.down_proj.bias is not None:
            return "an FFN with biases runs the Python step"
    return None


SCORING = {"sigmoid": 0, "softmax": 1}  # the C++ router's codes for moe.route()'s variants
METHODS = {"noaux_tc": 0, "greedy": 1, "group_limited_greedy": 2}


def _unsupported_routing(gate: torch.nn.Module) -> str | None:
    """The C++ router implements moe.route()'s variants (DeepSeek-V3's sigmoid noaux_tc, V2's softmax greedy and
    group_limited_greedy); anything else runs the Python step, never a silently different routing."""
    scoring, method = getattr(gate, "scoring_func", "sigmoid"), getattr(gate, "topk_method", "noaux_tc")
    if scoring not in SCORING or method not in METHODS:
        return f"routing {scoring}/{method} runs the Python step"
    if gate.n_experts > MAX_EXPERTS or gate.n_group > MAX_GROUPS:
        return f"more than {MAX_EXPERTS} experts or {MAX_GROUPS} groups run the Python step"
    return None


def routing_of(gate: torch.nn.Module) -> list[float]:
    """The router's numbers as the C++ side takes them (every MoE layer of a model routes alike)."""
    scoring, method = getattr(gate, "scoring_func", "sigmoid"), getattr(gate, "topk_method", "noaux_tc")
    return [float(x) for x in (gate.n_experts, gate.top_k, gate.n_group, gate.topk_group, gate.norm_topk_prob,
                               gate.route_scale, SCORING[scoring], METHODS[method])]


def _layer_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    a = layer.self_attn
    t = {"in_norm": layer.input_layernorm.weight, "w_in": a.w_in, "kv_a_norm": a.kv_a_layernorm.weight,
         "kv_b": a.kv_b_proj.weight, "w_o": a.w_o, "post_norm": layer.post_attention_layernorm.weight}
    if a.q_lora_rank is not None:
        t |= {"q_a_norm": a.q_a_layernorm.weight, "w_q_b": a.w_q_b}
    mlp = layer.mlp
    if hasattr(mlp, "gate"):  # MoE
        t |= {"w13": mlp.shared_experts.w13, "w2": mlp.shared_experts.w2, "gate": mlp.gate.weight,
              "ew13": mlp.w13, "ew2": mlp.w2}
        if mlp.gate.e_score_correction_bias is not None:  # (only noaux_tc routing has one)
            t["bias"] = mlp.gate.e_score_correction_bias
    else:
        t |= {"w13": mlp.w13, "w2": mlp.w2}
    if hasattr(layer, "eh_proj"):  # the MTP module
        t |= {"enorm": layer.enorm.weight, "hnorm": layer.hnorm.weight, "w_eh": layer.w_eh,
              "head_norm": layer.shared_head.norm.weight}
    return {k: v.detach() if isinstance(v, torch.nn.Parameter) else v for k, v in t.items()}


class NativeModel:
    """The C++ step over `model`'s own tensors and the engine's cache `kv` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, kv: torch.Tensor):
        why = unsupported(model)
        if why:
            raise ValueError(why)
        module = load_native()
        if module is None:
            raise RuntimeError(f"the C++ step could not be built: {build_error()}")
        self.model, self.kv, self._module = model, kv, module
        self._build()

    def _build(self) -> None:
        m, c = self.model, self.model.config
        top = {"embed": m.embed_w, "head": m.head_w, "norm": m.model.norm.weight.detach(),
               "inv_freq": m.model.rotary_emb.inv_freq}
        layers = [_layer_tensors(layer) for layer in m.main_layers]
        mtp = _layer_tensors(m.mtp_layers[0]) if len(m.mtp_layers) else {}
        cfg = {k: float(getattr(c, k)) for k in ("hidden_size", "num_attention_heads", "qk_nope_head_dim",
                                                 "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "vocab_size",
                                                 "rms_norm_eps", "softmax_scale")}
        cfg |= {"q_lora_rank": float(c.q_lora_rank or 0),
                "attention_factor": float(m.model.rotary_emb.attention_factor)}
        gates = [layer.mlp.gate for layer in m.main_layers if hasattr(layer.mlp, "gate")]
        routing = routing_of(gates[0]) if gates else [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
        self._prepared = m.embed_w  # a new `prepare` makes new tensors: then take them again
        self._impl = self._module.Model(top, layers, mtp, cfg, self.kv, routing)

    @property
    def impl(self) -> Any:
        if self.model.embed_w is not self._prepared:
            self._build()
        return self._impl
