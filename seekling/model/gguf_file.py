"""A GGUF file (llama.cpp's format; what Ollama pulls) as a model source: its metadata, and its tensors as
sources the loader reads the way it reads a safetensors checkpoint's (seekling/checkpoint.py `StoredTensor`:
`shape`, `dtype`, `read(rows)`).

A family (seekling/model/families/) maps the file's tensor names onto the model's Hugging Face names; where
llama.cpp's converter reshaped a tensor the source undoes it: `GGUFTensor.select` takes rows of the stored
tensor (an expert of a stacked [n_expert, out, in] tensor, a permutation of rows), and `Derived` builds a tensor
from others (DeepSeek's kv_b_proj from attn_k_b and attn_v_b). Row selections work on the raw blocks (a row
of a quantised tensor is whole blocks), so `weight` hands the quantised bytes of exactly the model's tensor to
the int8/int4 repacking (`from_ggml` in seekling/model/quant.py: no float copy), and `read` dequantises them
to fp32 exactly (gguf.quants, numpy). The header is read by seekling/sources.py (gguf's GGUFReader takes ~40 s
over a 150k-token vocabulary); the data is mapped in the layout GGUFReader gives it, which from_ggml reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from seekling.model.quant import GGML_TYPES, QuantWeight, from_ggml
from seekling.sources import read_gguf_header

Q = gguf.GGMLQuantizationType
# The tensor types seekling reads (those from_ggml repacks): the float ones, and the quantisations of Q8_0 and
# Q4_K_M files (Q4_K_M mixes Q4_K, Q5_K, Q6_K and Q8_0) and of older ones (Q4_0, Q4_1, Q5_0, Q5_1).
READ_TYPES = tuple(Q(t) for t in GGML_TYPES)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
_KNOWN_TYPES = {int(t) for t in Q if t in gguf.GGML_QUANT_SIZES}


@dataclass(frozen=True)
class GGUFTensor:
    """A stored tensor, or some rows of one, in torch order (`shape`); nothing is read until `raw` / `read`."""

    file: Path
    name: str
    ggml_type: Q
    data: np.ndarray  # the reader's (memory-mapped) view of the whole tensor: [..., values or bytes of a row]
    shape: tuple[int, ...]
    rows: np.ndarray | None = None  # rows of the stored [rows, row] view this tensor is (None: all, in order)

    @property
    def dtype(self) -> str:
        return self.ggml_type.name  # "F32", "BF16", "Q8_0", ...

    @property
    def is_float(self) -> bool:
        return self.ggml_type in FLOAT_TYPES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def select(self, rows: np.ndarray, shape: tuple[int, ...]) -> GGUFTensor:
        """The tensor of `shape` made of these rows (indices into this tensor's own rows)."""
        base = rows if self.rows is None else self.rows[rows]
        return GGUFTensor(self.file, self.name, self.ggml_type, self.data, tuple(shape), base)

    def raw(self, rows: slice | None = None) -> np.ndarray:
        """The stored data of this tensor's rows (or rows [start, stop) of them), [n, row] in the reader's units
        (values for float types, bytes for quantised ones): a copy out of the mapped file."""
        # a 1-D tensor's rows are its elements (a permuted bias), else rows of the last dimension
        stored = self.data.reshape(-1, 1 if self.data.ndim == 1 else self.data.shape[-1])
        if self.rows is None:
            return np.array(stored if rows is None else stored[rows])
        return stored[self.rows if rows is None else self.rows[rows]]

    def weight(self) -> torch.Tensor | QuantWeight:
        """In seekling's layouts, with no float copy of a quantised tensor: fp32 for the float types, int8 / int4
        for the quantised ones (`from_ggml`)."""
        return from_ggml(self.raw(), int(self.ggml_type), self.shape)

    def read(self, rows: slice | None = None) -> torch.Tensor:
        """fp32, dequantised exactly (rows [start, stop) of the first dimension when given)."""
        raw = self.raw(_row_slice(rows, self.shape) if rows is not None else None)
        values = raw if self.ggml_type == Q.F32 else gguf.quants.dequantize(raw, self.ggml_type)
        first = self.shape[0] if rows is None else len(range(*rows.indices(self.shape[0])))
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(first, *self.shape[1:])


def _row_slice(rows: slice, shape: tuple[int, ...]) -> slice:
    """Rows [start, stop) of the first dimension -> the rows of the [rows, last dim] view."""
    per = math.prod(shape[1:-1]) if len(shape) > 2 else 1
    start, stop, _ = rows.indices(shape[0])
    return slice(start * per, stop * per)


def _data(mapped: np.memmap, offset: int, kind: Q, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's bytes in the mapped file as gguf's GGUFReader presents them: float32 / float16 values in torch
    order, or for the other types bytes with the last dimension counted in bytes."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    nbytes = math.prod(shape) // block * size
    if offset + nbytes > mapped.shape[0]:
        raise ValueError(f"the file ends inside the data of a tensor of shape {list(shape)}: truncated")
    raw = mapped[offset:offset + nbytes]
    if kind in (Q.F32, Q.F16):
        return raw.view(np.float32 if kind == Q.F32 else np.float16).reshape(shape)
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


@dataclass(frozen=True)
class Derived:
    """A tensor the converter split into others, rebuilt in fp32 when read (never quantised as stored)."""

    file: Path
    name: str
    shape: tuple[int, ...]
    build: Callable[[], torch.Tensor]
    dtype: str = "F32"
    is_float: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, rows: slice | None = None) -> torch.Tensor:
        t = self.build()
        return t if rows is None else t[rows]


class GGUFFile:
    """The metadata and tensors of a GGUF file (read from its header; the tensor data is mapped, not read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata, infos, start = read_gguf_header(self.path)
        mapped = np.memmap(self.path, np.uint8, mode="r")
        self.tensors: dict[str, GGUFTensor] = {}
        for t in infos:
            if t.ggml_type not in _KNOWN_TYPES:
                raise ValueError(f"{self.path.name} holds tensors of type {t.ggml_type}; seekling reads "
                                 f"{', '.join(name for name, _, _ in GGML_TYPES.values())}")
            kind = Q(t.ggml_type)
            shape = tuple(reversed(t.dims))
            self.tensors[t.name] = GGUFTensor(self.path, t.name, kind, _data(mapped, start + t.offset, kind, shape),
                                              shape)
        self.arch: str = self.metadata.get("general.architecture", "")

    def __getitem__(self, key: str) -> Any:
        """An architecture key ("block_count" -> "{arch}.block_count"); a missing one is a ValueError naming it."""
        full = f"{self.arch}.{key}"
        if full not in self.metadata:
            raise ValueError(f"{self.path.name}: the GGUF has no {full} key")
        return self.metadata[full]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    def check_types(self) -> None:
        """One clear line for a tensor type seekling does not read."""
        unread = sorted({t.ggml_type.name for t in self.tensors.values() if t.ggml_type not in READ_TYPES})
        if unread:
            names = ", ".join(name for name, _, _ in GGML_TYPES.values())
            raise ValueError(f"{self.path.name} holds tensors of type {', '.join(unread)}; seekling reads {names} "
                             "(re-quantise it, e.g. to Q4_K_M or Q8_0, with llama.cpp's llama-quantize)")

    def generation_config(self) -> tuple[dict[str, Any], list[int]]:
        """(SamplingParams defaults, end-of-generation token ids), as `read_generation_config` gives a
        directory's: llama.cpp's general.sampling.* keys, and eos plus eot / eom when the file names them."""
        keys = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p"}
        defaults = {ours: self.metadata[f"general.sampling.{theirs}"] for ours, theirs in keys.items()
                    if f"general.sampling.{theirs}" in self.metadata}
        eos = [self.metadata[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")
               if f"tokenizer.ggml.{k}_token_id" in self.metadata]
        return defaults, list(dict.fromkeys(int(i) for i in eos))
