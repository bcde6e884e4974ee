"""seekling's C++ CPU kernels (kernels.cpp): building them, and the path that runs when they cannot be built.

The kernels are compiled on first use with torch's cpp_extension and the user's C++ compiler (-march=native;
~1 minute once, cached under ~/.cache/torch_extensions, keyed by the CPU and the source). Off the CPU, or
without a compiler, the quantised products run elsewhere: see `quantized_linear`.
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


def load_kernels() -> bool:
    """Compile (first time) and load the C++ kernels; True when they are available. Thread-safe, once."""
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
                _state["loaded"] = True
                log.info("matmul path: seekling's C++ kernels (%s)", torch.ops.seekling.simd_level())
            except Exception as e:  # no compiler, an unsupported platform: torch's own ops still work
                log.warning("seekling's CPU kernels could not be built (%s: %s); using the slower torch path",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                _state["loaded"] = False
        return bool(_state["loaded"])


def loaded() -> bool:
    return bool(_state["loaded"])


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing (the ops exist once the library is loaded)."""
    torch.library.register_fake("seekling::f32_linear")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("seekling::int8_linear")(lambda x, q, s, bs: x.new_empty(x.shape[0], s.shape[0]))
    torch.library.register_fake("seekling::int4_linear")(
        lambda x, q, codes, dm, out: x.new_empty(x.shape[0], out))


def use_kernels(device: torch.device) -> bool:
    """Load the kernels when decoding runs on the CPU (a no-op elsewhere); True when they are in use."""
    return device.type == "cpu" and load_kernels()


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


def int4_fit(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 groups' (scale, min) search in C++ (seekling.model.quant.int4_fit is its reference)."""
    s, m = torch.ops.seekling.int4_fit(groups.contiguous())
    return s, m
