"""Prepared weights for decoding on a CPU: int8 weights and the matmul kernels that stream them.

Batch-1 decoding is bound by the bytes of weights read per token, so what a weight costs is how it is
stored and how the kernel reads it. `linear(x, w)` is the one matmul of every inference forward:
  - w a float tensor [out, in]: at one to a few rows of x (decode) on the CPU, seekling's fp32 kernel
    (kernels.cpp), which streams the weight at ~2.5x torch's `F.linear` bandwidth at one row; otherwise
    F.linear (MKL for prefill-sized batches; any dtype; any device).
  - w an `Int8Weight`: int8 values with one fp32 scale per output row (symmetric, max|w| / 127), 1 byte per
    weight and nothing else, laid out in tiles of 4 rows that the kernel reads as one stream: the same tensor
    serves the matmul and, for embeddings, the row lookup (a tied lm_head is one tensor). x is quantised to
    int8 per block of 32 inside the kernel (llama.cpp's Q8_0 activations), so the product runs in integer
    SIMD (AVX2 maddubs) at memory bandwidth.
The C++ kernels are compiled on first use with torch's cpp_extension (a C++ compiler is needed, as for
torch.compile; ~1 minute once, cached under ~/.cache/torch_extensions). Without a compiler, or off the CPU,
the torch reference below computes the same quantised product (slowly: it dequantises per call).

Quality of int8 (8-bit per-row weights, 8-bit per-32 activations) vs fp32, teacher-forced: see
docs/benchmarks.md; the error bound is tested in tests/test_quant.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from seekling.atomic import write_bytes

log = logging.getLogger("seekling.kernels")
QBLOCK = 32  # activations are quantised per block of this many values (the weight rows are padded to it)
TILE = 4  # output rows per tile of the int8 layout (kernels.cpp)
QMAX = 127  # symmetric int8 range, -127..127 (never -128: see kernels.cpp)
SMALL_M = 4  # up to this many rows, fp32 matmuls take seekling's kernel; beyond, MKL's GEMM wins
_SOURCE = Path(__file__).with_name("kernels.cpp")
# -fopenmp: at::parallel_for is OpenMP pragmas, ignored (one thread) without it
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
_state = {"loaded": None}  # None: not tried; True / False: the kernels are (not) available
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
            except Exception as e:  # no compiler, an unsupported platform: the torch reference still works
                log.warning("seekling's CPU kernels could not be built (%s: %s); using the slower torch path",
                            type(e).__name__, e)
                _state["loaded"] = False
        return bool(_state["loaded"])


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing (the ops exist once the library is loaded)."""
    torch.library.register_fake("seekling::f32_linear")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("seekling::int8_linear")(lambda x, q, s: x.new_empty(x.shape[0], s.shape[0]))


@dataclass
class Int8Weight:
    """W ~= q * scale[:, None] for a weight [out, in]: int8 q in the kernel's layout, tiles of TILE output rows
    with their blocks of QBLOCK interleaved, [..., out / TILE, in / QBLOCK, TILE, QBLOCK] (rows and columns
    zero-padded to whole tiles and blocks), and fp32 scale [..., out]. Leading dims stack experts."""

    q: torch.Tensor
    scale: torch.Tensor
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.scale.shape[-1], self.in_features])

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def __getitem__(self, index: int) -> Int8Weight:
        """A stacked expert's weight (q [E, ...]): a view, no copy."""
        return Int8Weight(self.q[index], self.scale[index], self.in_features)

    def unpacked(self) -> torch.Tensor:
        """q back in row-major order, [..., out, in] (int8)."""
        *lead, tiles, blocks, tile, block = self.q.shape
        rows = self.q.transpose(-3, -2).reshape(*lead, tiles * tile, blocks * block)
        return rows[..., :self.scale.shape[-1], :self.in_features]

    def dequantize(self) -> torch.Tensor:
        return self.unpacked().float() * self.scale[..., None]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: the dequantised rows `ids` -> [*ids.shape, in] fp32 (row i lies in tile i // TILE)."""
        flat = ids.reshape(-1)
        q = self.q[flat // TILE, :, flat % TILE].flatten(1)[:, :self.in_features]
        return (q.float() * self.scale[flat][:, None]).view(*ids.shape, self.in_features)


def quantize(w: torch.Tensor) -> Int8Weight:
    """Symmetric int8 per output row (max|w| / 127) of a weight [..., out, in], laid out for the kernel."""
    w = w.detach().float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-30) / QMAX
    q = torch.round(w / scale[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    *lead, out, k = q.shape
    q = F.pad(q, (0, -k % QBLOCK, 0, -out % TILE))
    tiles, blocks = q.shape[-2] // TILE, q.shape[-1] // QBLOCK
    q = q.view(*lead, tiles, TILE, blocks, QBLOCK).transpose(-3, -2).contiguous()
    return Int8Weight(q, scale.contiguous(), k)


def concat(parts: list[Int8Weight]) -> Int8Weight:
    """Int8 weights stacked along their output rows (every part but the last a whole number of tiles)."""
    assert all(p.scale.shape[-1] % TILE == 0 for p in parts[:-1]), "parts must be whole tiles"
    return Int8Weight(torch.cat([p.q for p in parts], dim=-4), torch.cat([p.scale for p in parts], dim=-1),
                      parts[0].in_features)


def quantize_activations(x: torch.Tensor, padded: int) -> torch.Tensor:
    """The kernel's activation rounding, dequantised: x [M, K] -> [M, padded] fp32 (zeros beyond K)."""
    x = F.pad(x.float(), (0, padded - x.shape[-1])).view(x.shape[0], -1, QBLOCK)
    scale = x.abs().amax(-1, keepdim=True) / QMAX
    q = torch.where(scale > 0, torch.round(x / scale), 0.0).clamp_(-QMAX, QMAX)
    return (q * scale).view(x.shape[0], padded)


def int8_reference(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """The quantised product in torch ops (the kernels' reference; the path off the CPU or without them)."""
    xq = quantize_activations(x, -(-w.in_features // QBLOCK) * QBLOCK)[:, :w.in_features]
    return xq @ w.dequantize().T


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ w^T (+ bias): the matmul of every inference forward (see the module docstring). Written
    for few checks on the way: at batch 1 this wrapper runs ~30 times a step."""
    if type(w) is not Int8Weight:
        # Inside a compiled graph only the batch-1 graph takes the kernel: a branch on a symbolic batch size
        # would split the batch graph in two (and recompile at serving time).
        few = x.shape[0] == 1 if torch.compiler.is_compiling() else x.shape[0] <= SMALL_M
        if (not few or x.dim() != 2 or not _state["loaded"] or x.dtype != torch.float32
                or w.dtype != torch.float32 or not x.is_cpu):
            return F.linear(x, w, bias)
        y = torch.ops.seekling.f32_linear(x, w)
        return y if bias is None else y + bias
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.is_cpu and _state["loaded"]:
        y = torch.ops.seekling.int8_linear(x2 if x2.dtype == torch.float32 else x2.float(), w.q, w.scale)
    else:
        y = int8_reference(x2, w)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def embed(ids: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    return w.rows(ids) if isinstance(w, Int8Weight) else F.embedding(ids, w)


def use_kernels(device: torch.device) -> bool:
    """Load the kernels when decoding runs on the CPU (a no-op elsewhere); True when they are in use."""
    return device.type == "cpu" and load_kernels()
