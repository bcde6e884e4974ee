"""seekling's C++ CPU kernels (kernels.cpp): building them, and the path that runs when they cannot be built.

The kernels are compiled on first use with torch's cpp_extension and the user's C++ compiler (-march=native;
~1 minute once, cached under ~/.cache/torch_extensions, keyed by the CPU and the source).

Without a compiler (python:slim images, macOS without its command-line tools) the quantised products run on
torch's own int8 GEMM, fbgemm's dynamic linear (`quantized::linear_dynamic`): each int8 / int4 weight is packed
for it on first use as int8 with a scale per row (requantised: at most 1/254 of a row's largest
weight more error), and activations are quantised per call to 7 bits per tensor (`reduce_range`: AVX2's
maddubs would saturate at 8). Measured on a 2-core EPYC, one thread, CPU time: 1.3-2.4x the kernels' time at
batch 1, faster than them at 8 rows. Candidates ruled out: the torch reference (dequantising per call: 70x
slower), `aten._weight_int8pack_mm` (~30x slower at batch 1), `_weight_int4pack_mm_for_cpu` (0.4 GB/s). The
packed copy is kept beside the weight (the kernels' layout stays for embedding lookups): without a compiler a
quantised model holds ~1 more byte a weight. Off the CPU the torch reference (quant.py) runs. torch 2.13 warns
that its quantised tensors are deprecated: when they go, this path falls back to the reference.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seekling.atomic import write_bytes

log = logging.getLogger("seekling.kernels")
SMALL_M = 4  # up to this many rows, fp32 matmuls take seekling's kernel; beyond, MKL's GEMM wins
_SOURCE = Path(__file__).with_name("kernels.cpp")
# -fopenmp: at::parallel_for is OpenMP pragmas, ignored (one thread) without it
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
_state: dict[str, Any] = {"loaded": None}  # None: not tried; True / False: the kernels are (not) available
_lock = threading.Lock()


def _cpu_tag() -> str:
    """Built with -march=native: key the build by the CPU, so a shared home directory never hands one
    machine's binary to another CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def load(check: Callable[[], None]) -> bool:
    """Compile (first time) and load the C++ kernels, then run `check` (raising: the kernels compute wrongly on
    this CPU); True when they are available. Thread-safe, once."""
    with _lock:
        if _state["loaded"] is None:
            try:
                from torch.utils.cpp_extension import load

                # Named by the CPU and the source's hash, and built from a copy at a fixed place: checkouts of
                # the same source share one build (torch rebuilds when the source's path changes).
                source = _SOURCE.read_bytes()
                key = source + " ".join(_CFLAGS).encode()
                name = f"seekling_kernels_{_cpu_tag()}_{hashlib.sha1(key).hexdigest()[:8]}"
                cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                copy = cache / "seekling" / name / "kernels.cpp"
                if not copy.exists() or copy.read_bytes() != source:
                    write_bytes(copy, source)
                load(name=name, sources=[str(copy)], is_python_module=False, verbose=False, extra_cflags=_CFLAGS,
                     extra_ldflags=["-fopenmp"])
                _register_fakes()
                check()
                _state["loaded"] = True
                log.info("matmul path: seekling's C++ kernels (%s)", torch.ops.seekling.simd_level())
            except Exception as e:  # no compiler, an unsupported platform: torch's own ops still work
                log.warning("matmul path: torch's own ops (fbgemm int8 for quantised weights, F.linear for fp32): "
                            "seekling's C++ kernels could not be built (%s: %s)", type(e).__name__,
                            str(e).strip().splitlines()[-1] if str(e).strip() else "")
                _state["loaded"] = False
        return bool(_state["loaded"])


def loaded() -> bool | None:
    """True: the kernels run; False: they could not be built (torch's int8 path runs); None: not tried yet (the
    exact torch reference runs: `use_kernels` decides once an engine starts)."""
    return _state["loaded"]


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing (the ops exist once the library is loaded)."""
    torch.library.register_fake("seekling::f32_linear")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("seekling::int8_linear")(lambda x, q, s, out: x.new_empty(x.shape[0], out))
    torch.library.register_fake("seekling::int4_linear")(
        lambda x, q, codes, dm, out: x.new_empty(x.shape[0], out))


def float_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 at one to a few rows on the CPU: seekling's kernel (it streams the weight at ~2.5x torch's
    F.linear bandwidth at one row); otherwise F.linear (MKL for prefill-sized batches; any dtype; any device)."""
    # Inside a compiled graph only the batch-1 graph takes the kernel: a branch on a symbolic batch size
    # would split the batch graph in two (and recompile at serving time).
    few = x.shape[0] == 1 if torch.compiler.is_compiling() else x.shape[0] <= SMALL_M
    if (not few or x.dim() != 2 or not _state["loaded"] or x.dtype != torch.float32 or w.dtype != torch.float32
            or not x.is_cpu):
        return F.linear(x, w, bias)
    y = torch.ops.seekling.f32_linear(x, w)
    return y if bias is None else y + bias


def fallback_linear(x: torch.Tensor, w: Any) -> torch.Tensor | None:
    """x [M, K] fp32 @ W^T on fbgemm's dynamic int8 linear (see the module docstring); None when this torch
    has no quantised engine (then the caller dequantises)."""
    packed = w.__dict__.get("_fbgemm")
    if packed is None:
        packed = w.__dict__["_fbgemm"] = _pack(w)
    if packed is False:
        return None
    return torch.ops.quantized.linear_dynamic(x, packed, True)


def _pack(w: Any) -> Any:
    """The weight as fbgemm's packed int8 (a scale per row), built a chunk of rows at a time."""
    out, k = w.shape  # requantised per row (fbgemm's granularity)
    values, scales = torch.empty(out, k, dtype=torch.int8), torch.empty(out, dtype=torch.float64)
    step = max(1, (1 << 22) // max(1, k))
    for a in range(0, out, step):
        rows = w.rows(torch.arange(a, min(a + step, out)))
        s = rows.abs().amax(-1).clamp(min=1e-30) / 127
        values[a:a + step], scales[a:a + step] = torch.round(rows / s[:, None]).clamp_(-127, 127), s
    try:
        with warnings.catch_warnings():  # torch 2.13 marks quantised tensors deprecated; still its one fast op
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(values, scales, torch.zeros(out, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qweight, None)
    except (RuntimeError, NotImplementedError) as e:
        log.warning("torch's quantised engine is not available here (%s); quantised weights are dequantised per "
                    "call (slow)", e)
        return False


def int4_fit(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 groups' (scale, min) search in C++ (seekling.model.quant.int4_fit is its reference)."""
    s, m = torch.ops.seekling.int4_fit(groups.contiguous())
    return s, m
