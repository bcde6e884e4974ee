"""Prepared weights for decoding on a CPU: int8 and int4 weights, and the one matmul that reads them.

Batch-1 decoding is bound by the bytes of weights read per token, so what a weight costs is how it is stored
and how the kernel reads it. `linear(x, w)` is the one matmul of every inference forward; w is one of
  - a float tensor [out, in]: seekling's fp32 kernel at one to a few rows on the CPU, else F.linear;
  - `Int8Weight`: int8 values, symmetric, with an fp16 scale per block of 32: llama.cpp's Q8_0, 8.5 bits a weight.
    (Per-row scales, 8.0 bits, measured 22x the KL against fp32 on a trained speedrun model: trained weights
    have outliers within rows, which a scale per 32 confines.)
  - `Int4Weight`: 4-bit values in groups of 32 with a scale and a min each, w = d·sc·q - dmin·m (q 0..15), the
    group's scale and min as 8-bit codes (sc 0..255, m -127..127) under an fp16 (d, dmin) per super-block of 8
    groups: 4 + 16/32 + 32/256 = 4.625 bits a weight. This is llama.cpp's Q4_K structure with 8-bit codes where
    Q4_K has 6-bit ones, so a Q4_K tensor repacks into it exactly (`from_ggml`), and groups of 32 (not 256)
    let any row width that is a multiple of 32 quantise (a 1,408-wide expert down-projection does; Q4_K
    falls back to 5 or 8 bits there). The min (asymmetric groups) is worth ~15% less squared error than
    Q4_0-style symmetric groups at 0.125 bits; `quantize(w, "int4")` fits each group's scale and min by
    searching around the min-max fit for the least weighted squared error (llama.cpp's make_qkx2 idea).
The kernels (kernels.cpp) quantise x to int8 per block of 32 for int8 weights and per 256 for int4 (llama.cpp's
Q8_0 and Q8_K activations: a whole super-block's products then add up in int32; measured against per-32 on the
models of docs/benchmarks.md: the same KL on a Moonlight-shape random model, +4% on a trained speedrun model,
for 15-30% less time a product) and multiply in integer SIMD (AVX2 maddubs): at batch 1 they read the weights at
memory bandwidth, at more rows each weight load serves several rows of x.

`from_ggml(data, ggml_type, shape)` turns a GGUF tensor's raw bytes into these layouts, one chunk of rows at
a time (never a float copy of the tensor): F32/F16/BF16 -> fp32 tensor; Q8_0, Q5_0 -> int8 exactly; Q4_K ->
int4 exactly; Q4_0, Q4_1 -> int4 with their fp16 group scales re-coded in 8 bits (each group's scale and min
within half a code step, 1/510 of the super-block's largest); Q5_1, Q5_K, Q6_K -> int8 with a scale per block
of 32 (requantised: the added error is at most 1/254 of each block's largest weight).

The C++ kernels are compiled on first use (seekling/model/kernels.py); without a compiler the products run on
torch's own int8 path (see there), and off the CPU on the torch reference below (dequantising per call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from seekling.model import kernels

__all__ = ["KINDS", "Int4Weight", "Int8Weight", "QBLOCK", "RowStack", "TILE", "concat", "embed", "from_ggml",
           "head_kind", "layer_mode", "linear", "load_kernels", "natural_kind", "quantize", "quantize_stack",
           "quantized_nbytes", "use_kernels", "weight_kind"]

QBLOCK = 32  # activations are quantised per block of this many values (weight rows are padded to it)
TILE = 4  # output rows per tile of the kernels' layouts
QMAX = 127  # symmetric int8 range, -127..127 (never -128: see kernels.cpp)
GROUP = 32  # int4 values per (scale, min) group
SUPER = 8  # int4 groups per super-block (one fp16 d, dmin): 256 values, as Q4_K
PAIR = 2 * GROUP  # int4 rows are padded to whole pairs of groups: one 32-byte load holds two groups
CHUNK = 1 << 22  # values quantised at a time (16 MB of fp32): the transient memory of a quantising load
KINDS = ("int8", "int4")
ABLOCK = {"int8": QBLOCK, "int4": GROUP * SUPER}  # activations quantised per this many values for each kind


# --------------------------------------------------------------------------------------------- layouts


def _tiles(rows: int) -> int:
    return -(-rows // TILE)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class Int8Weight:
    """W ~= q * scale per block of 32 for a weight [out, in] (llama.cpp's Q8_0: int8 values, symmetric, an fp16
    scale each 32): int8 q in the kernel's layout, tiles of TILE output rows with their blocks of QBLOCK
    interleaved, [..., out / TILE, in / QBLOCK, TILE, QBLOCK], and the scales [..., out / TILE, in / QBLOCK,
    TILE] beside them (rows and columns zero-padded to whole tiles and blocks). Leading dims stack experts."""

    q: torch.Tensor
    scale: torch.Tensor
    in_features: int
    out_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.out_features, self.in_features])

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2

    def __getitem__(self, index: int) -> Int8Weight:
        """A stacked expert's weight (q [E, ...]): a view, no copy."""
        return Int8Weight(self.q[index], self.scale[index], self.in_features, self.out_features)

    def _rows(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Rows laid out [..., blocks, 32] with their scales [..., blocks] -> [..., in] fp32."""
        return (q.float() * scale.float()[..., None]).flatten(-2)[..., :self.in_features]

    def dequantize(self) -> torch.Tensor:
        *lead, tiles, blocks, tile, block = self.q.shape
        rows = self._rows(self.q.transpose(-3, -2), self.scale.transpose(-2, -1))  # [..., tiles, TILE, in]
        return rows.reshape(*lead, tiles * tile, self.in_features)[..., :self.out_features, :]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: the dequantised rows `ids` -> [*ids.shape, in] fp32 (row i lies in tile i // TILE)."""
        flat = ids.reshape(-1)
        t, r = flat // TILE, flat % TILE
        return self._rows(self.q[t, :, r], self.scale[t, :, r]).view(*ids.shape, self.in_features)


@dataclass
class Int4Weight:
    """W[r, 32g + j] = d[s]·sc[g]·q - dmin[s]·m[g] (s = g // SUPER) for a weight [out, in], row-major (the
    kernel walks one row at a time: each row is one sequential stream; leading dims stack experts; in is
    padded to PAIR values and the codes to whole super-blocks, with zeros):
      q      uint8 [..., out, in / 64, 32]: byte j of pair p holds value j of group 2p (low nibble) and of group
             2p + 1 (high nibble), which is how Q4_K stores its 128 bytes a super-block;
      codes  uint8 [..., out, 2, groups]: the scale codes sc (0..255), then the min codes m (int8, -127..127,
             stored as their bytes); groups = in / 32 rounded up to a whole super-block;
      dm     fp16 [..., out, groups / SUPER, 2]: per super-block, (d, dmin)."""

    q: torch.Tensor
    codes: torch.Tensor
    dm: torch.Tensor
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.q.shape[-3], self.in_features])

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.codes.numel() + self.dm.numel() * 2

    def __getitem__(self, index: int) -> Int4Weight:
        return Int4Weight(self.q[index], self.codes[index], self.dm[index], self.in_features)

    def _dequantize(self, q: torch.Tensor, codes: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
        """Rows (q [..., pairs, 32], codes [..., 2, groups], dm [..., supers, 2]) -> [..., in] fp32."""
        *lead, pairs, _ = q.shape
        g = 2 * pairs
        values = torch.stack([q & 15, q >> 4], dim=-2).view(*lead, g, GROUP).float()
        dm = dm.float().repeat_interleave(SUPER, dim=-2)[..., :g, :]  # [..., groups, 2]
        scale = dm[..., 0] * codes[..., 0, :g].float()
        low = dm[..., 1] * codes[..., 1, :g].view(torch.int8).float()
        return (values * scale[..., None] - low[..., None]).view(*lead, -1)[..., :self.in_features]

    def dequantize(self) -> torch.Tensor:
        return self._dequantize(self.q, self.codes, self.dm)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = self._dequantize(self.q[flat], self.codes[flat], self.dm[flat])
        return out.view(*ids.shape, self.in_features)


@dataclass
class RowStack:
    """Quantised weights of different kinds stacked on their output rows: a fused projection whose parts a GGUF
    file stores in different types (Q4_K_M's q and k in Q4_K, v in Q6_K). `linear` runs each part and
    concatenates the outputs."""

    parts: list[Int8Weight | Int4Weight]

    @property
    def shape(self) -> torch.Size:
        return torch.Size([sum(p.shape[0] for p in self.parts), self.parts[0].in_features])

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts], dim=-2)


QuantWeight = Int8Weight | Int4Weight | RowStack


def _empty(kind: str, lead: tuple[int, ...], out: int, k: int) -> QuantWeight:
    """A zero weight of `kind` to be filled row by row (`_put`): the padding stays zero and contributes 0."""
    if kind == "int8":
        t, blocks = _tiles(out), -(-k // QBLOCK)
        return Int8Weight(torch.zeros(*lead, t, blocks, TILE, QBLOCK, dtype=torch.int8),
                          torch.zeros(*lead, t, blocks, TILE, dtype=torch.float16), k, out)
    pairs = -(-k // PAIR)
    supers = -(-2 * pairs // SUPER)
    return Int4Weight(torch.zeros(*lead, out, pairs, 32, dtype=torch.uint8),
                      torch.zeros(*lead, out, 2, supers * SUPER, dtype=torch.uint8),
                      torch.zeros(*lead, out, supers, 2, dtype=torch.float16), k)


def _put(w: QuantWeight, lead: tuple[int, ...], row0: int, pieces: tuple[torch.Tensor, ...]) -> None:
    """Write rows [row0, row0 + n) given in row-major pieces (as the `_*_rows` quantisers return them)."""
    n = pieces[0].shape[0]
    if isinstance(w, Int8Weight):
        rows = torch.arange(row0, row0 + n)
        t, r = rows // TILE, rows % TILE
        q, scale = pieces
        w.q[lead].transpose(-3, -2)[t, r] = q
        w.scale[lead].transpose(-2, -1)[t, r] = scale
    else:
        for target, piece in zip((w.q, w.codes, w.dm), pieces, strict=True):
            target[lead][row0:row0 + n] = piece


# ------------------------------------------------------------------------------------- quantising rows


def _fast(x: torch.Tensor) -> bool:
    """Whether the kernels' one-pass row quantisers take these rows (as the file stores them: fp32 or bf16)."""
    return bool(kernels.loaded()) and x.dtype in (torch.float32, torch.bfloat16)


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per block of 32 (max|w| / 127 as fp16; the values rounded against the stored scale):
    x [n, k] -> (q [n, blocks, 32] int8, scale [n, blocks] fp16)."""
    if _fast(x):
        return torch.ops.seekling.quantize_int8_rows(x)
    blocks = F.pad(x.float(), (0, -x.shape[1] % QBLOCK)).view(x.shape[0], -1, QBLOCK)
    scale = (blocks.abs().amax(-1) / QMAX).half()
    s = scale.float()[..., None]
    q = torch.where(s > 0, torch.round(blocks / s), 0).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int4_fit(groups: torch.Tensor, steps: int = 21) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (scale, min) for w ~ scale·q - min, q in 0..15: groups [N, 32] fp32 -> ([N], [N]).

    The min-max fit, then `steps` candidate scales from 14/range to 16/range: each rounds the group, solves the
    least-squares scale and offset for that rounding (weighted by rms + |w|, so large weights count more), and
    the best is kept (a candidate's residual is Σw x² - scale·Σw x q - offset·Σw x: the least-squares residual
    is orthogonal to q and 1). The same search as kernels.cpp's `int4_fit` (this is its reference and the path
    without the kernels); llama.cpp's Q4_K quantiser searches the same way (make_qkx2_quants)."""
    x = groups
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    span = (hi - lo).clamp(min=1e-30)
    w = x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    sw, swx, swx2 = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True), (w * x * x).sum(-1, keepdim=True)
    best_s, best_b = span / 15, lo  # offset b = -min
    q = torch.round((x - lo) / best_s).clamp(0, 15)
    best_e = (w * (best_s * q + best_b - x) ** 2).sum(-1, keepdim=True)
    for i in range(steps):
        q = torch.round((x - lo) * ((14 + 2 * i / max(steps - 1, 1)) / span)).clamp(0, 15)
        swl, swl2, swxl = (w * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True), (w * x * q).sum(-1,
                                                                                                            keepdim=True)
        det = sw * swl2 - swl * swl
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        s, b = (sw * swxl - swx * swl) / det, (swl2 * swx - swl * swxl) / det
        e = swx2 - s * swxl - b * swx
        better = ok & (e < best_e) & (s > 0)
        best_e, best_s, best_b = torch.where(better, e, best_e), torch.where(better, s, best_s), torch.where(
            better, b, best_b)
    return best_s.squeeze(-1), -best_b.squeeze(-1)


def _int4_codes(scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group scales and mins [n, groups] -> (codes [n, 2, G] uint8, dm [n, G / SUPER, 2] fp16, the coded
    (scale, min) [n, groups, 2] fp32), G = groups rounded up to a whole super-block (zero codes beyond)."""
    n, g = scale.shape
    pad = -g % SUPER
    s, m = F.pad(scale, (0, pad)).view(n, -1, SUPER), F.pad(low, (0, pad)).view(n, -1, SUPER)
    d = (s.amax(-1, keepdim=True) / 255).half()
    dmin = (m.abs().amax(-1, keepdim=True) / QMAX).half()
    df, dminf = d.float(), dmin.float()
    sc = torch.where(df > 0, torch.round(s / df), 0).clamp_(0, 255)
    mc = torch.where(dminf > 0, torch.round(m / dminf), 0).clamp_(-QMAX, QMAX)
    coded = torch.stack([(df * sc).view(n, -1)[:, :g], (dminf * mc).view(n, -1)[:, :g]], dim=-1)
    codes = torch.stack([sc.view(n, -1).to(torch.uint8), mc.view(n, -1).to(torch.int8).view(torch.uint8)], dim=1)
    return codes, torch.cat([d, dmin], dim=-1), coded


def _int4_rows(x: torch.Tensor, scale: torch.Tensor | None = None,
               low: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, k] -> the int4 layout's row pieces (q [n, pairs, 32], codes, dm). Each group's (scale, min) is
    fitted (`int4_fit`) unless given; the 4-bit values are then rounded against the coded scale and min, so
    the codes' own rounding is compensated where it can be. With the kernels loaded, all of it in C++."""
    if scale is None and _fast(x):
        return torch.ops.seekling.quantize_int4_rows(x)
    n, k = x.shape
    groups = F.pad(x.float(), (0, -k % PAIR)).view(n, -1, GROUP)
    if scale is None:  # without the kernels, the min-max fit: the search in torch is ~40x slower than in C++,
        # and the no-compiler path requantises the weights to int8 for fbgemm anyway
        scale, low = int4_fit(groups.reshape(-1, GROUP), steps=0)
        scale, low = scale.view(n, -1), low.view(n, -1)
    else:
        scale, low = F.pad(scale, (0, groups.shape[1] - scale.shape[1])), F.pad(low, (0, groups.shape[1] -
                                                                                         low.shape[1]))
    codes, dm, coded = _int4_codes(scale, low)
    s, m = coded[..., 0:1], coded[..., 1:2]
    q = torch.where(s > 0, torch.round((groups + m) / s), 0).clamp_(0, 15).to(torch.uint8)
    q = q.view(n, -1, 2, GROUP)
    return q[:, :, 0] | (q[:, :, 1] << 4), codes, dm


def _read_rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of a 2-D weight, in its own dtype. A meta tensor carrying `stored` (the loader's handle on
    where the tensor lies in its file: anything with read(slice)) is read from there: a quantising load never
    holds the float tensor whole."""
    if t.is_meta:
        stored = getattr(t, "stored", None)
        if stored is None:
            raise ValueError("a meta tensor without a stored source cannot be quantised")
        return stored.read(slice(a, b))
    return t[a:b].detach()


def natural_kind(stored: object) -> str:
    """The kind a GGUF tensor keeps its bits in (Q4_0 / Q4_1 / Q4_K: int4; Q8_0, Q5_*, Q6_K: int8); int8 for
    anything else (a float tensor, a safetensors one)."""
    ggml_type = getattr(stored, "ggml_type", None)
    name = GGML_TYPES.get(int(ggml_type), ("",))[0] if ggml_type is not None else ""
    return "int4" if name in ("Q4_0", "Q4_1", "Q4_K") else "int8"


def _gguf_rows(t: torch.Tensor, kind: str) -> tuple[str, int] | None:
    """(ggml type name, bytes a block) when rows of `t` can go from their GGUF bytes straight into `kind`'s
    layout (`from_ggml`'s conversions: exact for Q4_K, Q8_0, Q5_0), else None."""
    stored = getattr(t, "stored", None) if t.is_meta else None
    if stored is None or not hasattr(stored, "raw") or natural_kind(stored) != kind:
        return None
    name, _, size = GGML_TYPES[int(stored.ggml_type)]
    return name, size


def _fill(w: QuantWeight, lead: tuple[int, ...], parts: Sequence[torch.Tensor], kind: str) -> None:
    """Quantise the parts (stacked on their rows) into w[lead], CHUNK values at a time."""
    row0 = 0
    for part in parts:
        rows, k = part.shape
        step = max(TILE, CHUNK // max(1, k) // TILE * TILE)
        gguf = _gguf_rows(part, kind)
        for a in range(0, rows, step):
            b = min(a + step, rows)
            if gguf is not None:
                raw = np.ascontiguousarray(part.stored.raw(slice(a, b))).view(np.uint8).reshape(b - a, -1)
                pieces = _ggml_chunk(*gguf, raw, b - a, k)[1]
            else:
                x = _read_rows(part, a, b)
                pieces = _int4_rows(x) if kind == "int4" else _int8_rows(x)
            _put(w, lead, row0 + a, pieces)
        row0 += rows


def quantize(w: torch.Tensor | Sequence[torch.Tensor], kind: str = "int8", role: str = "") -> QuantWeight:
    """A weight [..., out, in] (leading dims: stacked experts), or a list of 2-D parts stacked on their rows
    (a fused projection, with no float concatenation), quantised to `kind` ("int8": per-row symmetric;
    "int4": groups of 32, see the module docstring; a `layer_mode` answer with the weight's `role`) in the
    kernels' layout, a chunk of rows at a time."""
    kind = weight_kind(kind, role)
    parts = [w] if isinstance(w, torch.Tensor) else list(w)
    if kind == "gguf":  # each part keeps its GGUF type's bits: parts of different kinds become a RowStack
        kinds = [natural_kind(getattr(p, "stored", None)) for p in parts]
        if len(set(kinds)) > 1:
            return concat([quantize(p, k) for p, k in zip(parts, kinds, strict=True)])
        kind = kinds[0]
    if kind not in KINDS:
        raise ValueError(f"unknown quantisation {kind!r}: {', '.join(KINDS)}")
    if len(parts) == 1 and parts[0].dim() > 2:
        lead = tuple(parts[0].shape[:-2])
        out = _empty(kind, lead, parts[0].shape[-2], parts[0].shape[-1])
        for index in np.ndindex(*lead):
            _fill(out, index, [parts[0][index]], kind)
        return out
    return quantize_stack([parts], kind)[0]


def quantize_stack(experts: Sequence[Sequence[torch.Tensor]], kind: str = "int8", role: str = "") -> QuantWeight:
    """[E, out, in] from E experts' parts (each a list of 2-D tensors stacked on their rows, e.g. [gate, up]):
    every expert is quantised into its slot of one preallocated weight, so a load holds one expert's chunk in
    float at a time. Indexing the result (w[e]) is a view."""
    kind = weight_kind(kind, role)
    if kind == "gguf":  # the experts' own kind; the wider one (int8) when their parts differ
        kinds = {natural_kind(getattr(p, "stored", None)) for parts in experts for p in parts}
        kind = kinds.pop() if len(kinds) == 1 else "int8"
    if kind not in KINDS:
        raise ValueError(f"unknown quantisation {kind!r}: {', '.join(KINDS)}")
    out, k = sum(p.shape[0] for p in experts[0]), experts[0][0].shape[1]
    w = _empty(kind, (len(experts),), out, k)
    for e, parts in enumerate(experts):
        if sum(p.shape[0] for p in parts) != out or any(p.shape[1] != k for p in parts):
            raise ValueError("every expert's parts must have the same shapes")
        _fill(w, (e,), parts, kind)
    return w


def quantized_nbytes(shape: tuple[int, ...], kind: str) -> int:
    """What a weight [..., out, in] costs in `kind`'s layout (padding included): planned from headers."""
    *lead, out, k = shape
    n = math.prod(lead)
    if kind == "int8":
        return n * _tiles(out) * TILE * _round_up(k, QBLOCK) // QBLOCK * (QBLOCK + 2)
    groups = _round_up(2 * -(-k // PAIR), SUPER)
    return n * out * (_round_up(k, PAIR) // 2 + 2 * groups + 4 * groups // SUPER)


def head_kind(quantize_to: str) -> str:
    """The output head (and a tied embedding, the same tensor) stays at 8 bits under int4, as llama.cpp's
    Q4_K_M keeps it at 6: its errors go straight into the logits, and at batch 1 it is one matrix of many.
    ("gguf": a GGUF file's quantised tensors keep their own type's bits, `natural_kind`.)"""
    return "int8" if quantize_to.startswith("int4") else quantize_to


def layer_mode(quantize_to: str | None, layer: int, n_layers: int) -> str | None:
    """What `prepare` quantises layer `layer` of `n_layers` to: `quantize_to` itself (EXPERIMENT: policies)."""
    return quantize_to


def weight_kind(quantize_to: str, role: str = "") -> str:
    """The kind of one weight of a layer prepared with `layer_mode`'s answer: "int4+" layers keep their down
    projections ("down"; "expert_down" for routed experts) at 8 bits."""
    if quantize_to == "int4+":
        return "int8" if role in ("down", "expert_down") else "int4"
    return quantize_to


def concat(parts: list[QuantWeight]) -> QuantWeight:
    """Quantised weights of one width stacked along their output rows: the fused projections of a GGUF file,
    an embedding quantised in chunks. Parts of one kind become one weight (int8 parts but the last must be
    whole tiles); parts of different kinds a `RowStack`."""
    first = parts[0]
    if any(p.in_features != first.in_features for p in parts):
        raise ValueError("concat: the parts must have the same width")
    if any(type(p) is not type(first) for p in parts) or isinstance(first, RowStack):
        return RowStack([q for p in parts for q in (p.parts if isinstance(p, RowStack) else [p])])
    if isinstance(first, Int8Weight):
        if any(p.shape[0] % TILE for p in parts[:-1]):
            raise ValueError("concat: every int8 part but the last must be whole tiles")
        return Int8Weight(torch.cat([p.q for p in parts], dim=-4), torch.cat([p.scale for p in parts], dim=-3),
                          first.in_features, sum(p.out_features for p in parts))
    return Int4Weight(torch.cat([p.q for p in parts], dim=-3), torch.cat([p.codes for p in parts], dim=-3),
                      torch.cat([p.dm for p in parts], dim=-3), first.in_features)


# ------------------------------------------------------------------------------------------ the product


def quantize_activations(x: torch.Tensor, padded: int, block: int = QBLOCK) -> torch.Tensor:
    """The kernels' activation rounding, dequantised: x [M, K] -> [M, padded] fp32 (zeros beyond K), int8 per
    `block` values with one scale each (max|x| / 127)."""
    x = F.pad(x.float(), (0, padded - x.shape[-1])).view(x.shape[0], -1, block)
    scale = x.abs().amax(-1, keepdim=True) / QMAX
    q = torch.where(scale > 0, torch.round(x / scale), 0.0).clamp_(-QMAX, QMAX)
    return (q * scale).view(x.shape[0], padded)


def reference_product(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """The quantised product in torch ops: the kernels' reference, and the path off the CPU (it dequantises
    the weight per call: slow, but exact)."""
    block = ABLOCK["int4" if isinstance(w, Int4Weight) else "int8"]
    xq = quantize_activations(x, _round_up(w.in_features, block), block)[:, :w.in_features]
    return xq @ w.dequantize().to(xq.device).T


int8_reference = reference_product  # the name the int8 tests know


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ w^T (+ bias): the matmul of every inference forward (see the module docstring). Written
    for few checks on the way: at batch 1 this wrapper runs ~30 times a step."""
    tw = type(w)
    if tw is not Int8Weight and tw is not Int4Weight:
        if tw is RowStack:
            y = torch.cat([linear(x, p) for p in w.parts], dim=-1)
            return y if bias is None else y + bias
        return kernels.float_linear(x, w, bias)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    loaded = kernels.loaded()
    if not x2.is_cpu or loaded is None:
        y = reference_product(x2, w)
    elif loaded:
        xf = x2 if x2.dtype == torch.float32 else x2.float()
        if tw is Int4Weight:
            y = torch.ops.seekling.int4_linear(xf, w.q, w.codes, w.dm)
        else:
            y = torch.ops.seekling.int8_linear(xf, w.q, w.scale, w.out_features)
    else:
        y = kernels.fallback_linear(x2 if x2.dtype == torch.float32 else x2.float(), w)
        if y is None:
            y = reference_product(x2, w)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def load_kernels() -> bool:
    """Compile (first time) and load the C++ kernels (seekling/model/kernels.py), checked against the torch
    reference; True when they are available."""
    return kernels.load(_self_check)


def use_kernels(device: torch.device) -> bool:
    """Load the kernels when decoding runs on the CPU (a no-op elsewhere); True when they are in use."""
    return device.type == "cpu" and load_kernels()


def _self_check() -> None:
    """The built kernels against the torch reference on small random cases (a few ms): a SIMD path this CPU
    takes (AVX2, VNNI, the portable loops) that computed wrongly would turn into the fallback, not wrong
    tokens."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(37, 200, generator=g), torch.randn(5, 200, generator=g)
    for kind in ("int8", "int4"):
        q = quantize(w, kind)
        got = torch.ops.seekling.int4_linear(x, q.q, q.codes, q.dm) if kind == "int4" else \
            torch.ops.seekling.int8_linear(x, q.q, q.scale, q.out_features)
        ref = reference_product(x, q)
        if not torch.allclose(got, ref, atol=1e-3, rtol=1e-3):
            raise RuntimeError(f"the {kind} kernel disagrees with the torch reference on this CPU "
                               f"(max error {(got - ref).abs().max().item():.3g})")
    ref = x @ w.T
    if not torch.allclose(torch.ops.seekling.f32_linear(x, w), ref, atol=1e-3, rtol=1e-3):
        raise RuntimeError("the fp32 kernel disagrees with torch on this CPU")



def embed(ids: torch.Tensor, w: torch.Tensor | QuantWeight) -> torch.Tensor:
    return w.rows(ids) if isinstance(w, Int8Weight | Int4Weight) else F.embedding(ids, w)


# ------------------------------------------------------------------------------------------ GGUF tensors

# ggml type id -> (name, values per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18),
              3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 12: ("Q4_K", 256, 144),
              13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}


def _f16(b: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 from byte columns [n, 2k] -> [n, k] fp32."""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16).astype(np.float32))


def _nibbles(b: np.ndarray) -> torch.Tensor:
    """[n, 16] bytes of a ggml 32-block -> [n, 32] values (low nibbles are values 0..15, high ones 16..31)."""
    t = torch.from_numpy(np.ascontiguousarray(b))
    return torch.cat([t & 15, t >> 4], dim=-1)


def _q5_high_bits(b: np.ndarray) -> torch.Tensor:
    """Q5_0/Q5_1's 32 fifth bits (a little-endian uint32) -> [n, 32] values 0 or 16."""
    bits = np.ascontiguousarray(b).view("<u4").astype(np.int64)  # [n, 1]
    return torch.from_numpy(((bits >> np.arange(32)) & 1) << 4)


def _q4k_scale_min(s: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> ([n, 8], [n, 8]) (ggml's get_scale_min_k4)."""
    s = torch.from_numpy(np.ascontiguousarray(s)).view(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc, mn


def _ggml_chunk(name: str, size: int, raw: np.ndarray, n: int, k: int) -> tuple[str, tuple[torch.Tensor, ...]]:
    """One chunk of rows of a ggml tensor (raw bytes [n, row bytes], a writable copy) -> (kind, row pieces for
    `_put`)."""
    blocks = raw.reshape(-1, size)
    if name == "Q8_0":  # llama.cpp never writes -128 (the kernels' int8 range is -127..127): one would become -127
        q = torch.from_numpy(np.ascontiguousarray(blocks[:, 2:]).view(np.int8)).view(n, -1, QBLOCK)
        return "int8", (q.clamp(min=-QMAX), _f16(blocks[:, :2]).view(n, -1).half())
    if name == "Q5_0":  # w = d (q - 16), q 5 bits: int8 exactly
        q = (_nibbles(blocks[:, 6:]) | _q5_high_bits(blocks[:, 2:6])).to(torch.int16) - 16
        return "int8", (q.to(torch.int8).view(n, -1, QBLOCK), _f16(blocks[:, :2]).view(n, -1).half())
    if name in ("Q4_0", "Q4_1"):
        q = _nibbles(blocks[:, 2:18] if name == "Q4_0" else blocks[:, 4:20]).float()
        d = _f16(blocks[:, :2])
        if name == "Q4_0":  # w = d (q - 8): scale |d|, min 8|d|, or with d < 0, q -> 15 - q and min 7|d|
            neg = d < 0
            q = torch.where(neg, 15 - q, q)
            scale, low = d.abs(), torch.where(neg, 7, 8) * d.abs()
        else:  # w = d q + m
            scale, low = d, -_f16(blocks[:, 2:4])
        values = (q * scale - low).view(n, -1)
        return "int4", _int4_rows(values, scale.view(n, -1), low.view(n, -1))
    if name == "Q4_K":  # exactly: (d, dmin), the 6-bit codes, and the nibbles as they lie
        sc, mn = _q4k_scale_min(blocks[:, 4:16])
        codes = torch.stack([sc.reshape(n, -1), mn.reshape(n, -1)], dim=1)
        dm = _f16(blocks[:, :4]).view(n, -1, 2).half()
        q = torch.from_numpy(np.ascontiguousarray(blocks[:, 16:])).view(n, -1, 32)
        return "int4", (q, codes, dm)
    # Q5_1, Q5_K, Q6_K: no exact home at 4 or 8 bits here; requantised to int8 per block of 32
    from gguf.quants import GGMLQuantizationType, dequantize

    values = torch.from_numpy(dequantize(np.ascontiguousarray(blocks).reshape(n, -1),
                                         GGMLQuantizationType[name])).view(n, k)
    return "int8", _int8_rows(values)


def _ggml_float(name: str, raw: np.ndarray, n: int, k: int) -> torch.Tensor:
    if name == "F32":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float32).reshape(n, k).copy())
    if name == "F16":
        return _f16(raw).view(n, k)
    bits = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).astype(np.int32)) << 16  # BF16
    return bits.view(torch.float32).view(n, k)


def from_ggml(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor | QuantWeight:
    """A GGUF tensor (its raw bytes, as gguf's ReaderTensor.data gives them; `shape` in torch's order,
    [..., out, in]) in seekling's layouts: see the module docstring for what each type becomes and what is
    exact. Read and converted a chunk of rows at a time: a memory-mapped file is never copied whole, and no
    float copy of a quantised tensor is made."""
    if ggml_type not in GGML_TYPES:
        raise ValueError(f"GGUF tensor type {ggml_type} is not one seekling reads "
                         f"({', '.join(v[0] for v in GGML_TYPES.values())})")
    name, block, size = GGML_TYPES[ggml_type]
    *lead, out, k = shape if len(shape) > 1 else (1, *shape)
    if k % block:
        raise ValueError(f"GGUF {name} tensor of shape {list(shape)}: rows of {k} are not whole {block}-blocks")
    row_bytes = k // block * size
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    if raw.size != math.prod(lead) * out * row_bytes:
        raise ValueError(f"GGUF {name} tensor of shape {list(shape)}: {raw.size} bytes, expected "
                         f"{math.prod(lead) * out * row_bytes}")
    raw = raw.reshape(-1, row_bytes)
    step = max(TILE, CHUNK // k // TILE * TILE)
    if block == 1:
        result = torch.empty(math.prod(lead) * out, k)
        for a in range(0, raw.shape[0], step):
            b = min(a + step, raw.shape[0])
            result[a:b] = _ggml_float(name, np.array(raw[a:b]), b - a, k)
        return result.view(shape)
    w = None
    for e, index in enumerate(np.ndindex(*lead) if lead else [()]):
        for a in range(0, out, step):
            b = min(a + step, out)
            kind, pieces = _ggml_chunk(name, size, np.array(raw[e * out + a:e * out + b]), b - a, k)
            if w is None:
                w = _empty(kind, tuple(lead), out, k)
            _put(w, index, a, pieces)
    return w
