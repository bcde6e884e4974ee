"""Where a model comes from: a model directory (Hugging Face layout), a GGUF file, or a model pulled by Ollama.

    resolve_model("runs/speedrun/rl")      -> the directory
    resolve_model("model.gguf")            -> the file
    resolve_model("ollama:deepseek-r1:8b") -> ~/.ollama/models/blobs/sha256-... (a GGUF file)

Ollama keeps a pulled model as content-addressed blobs plus one manifest per name and tag:
`$OLLAMA_MODELS` (default `~/.ollama/models`) / manifests / <registry> / <namespace> / <model> / <tag>, a JSON
document whose layer of media type `application/vnd.ollama.image.model` names the GGUF blob by digest
(`sha256:<hex>`, stored as blobs/sha256-<hex>). A bare name is `registry.ollama.ai/library/<model>:latest`.
A GGUF's header (metadata and tensor table) is read here too, in one pass with numpy for the numeric arrays:
gguf's own GGUFReader builds a Python object per array element, ~40 s for a 150k-token vocabulary.
This module reads files only (no torch), so the tokenizer loader uses it too.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OLLAMA_PREFIX = "ollama:"
OLLAMA_REGISTRY = "registry.ollama.ai"
MODEL_LAYER = "application/vnd.ollama.image.model"
GGUF_MAGIC = b"GGUF"
# GGUF value types -> struct / numpy type codes (little-endian); 8 is a string, 9 an array
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def ollama_models_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def ollama_manifest(name: str, models: Path) -> Path:
    """The manifest of NAME[:TAG]: NAME is model, namespace/model or registry/namespace/model."""
    base, _, tag = name.partition(":")
    parts = [p for p in base.split("/") if p]
    if not parts or len(parts) > 3 or any(p in (".", "..") for p in parts) or "/" in tag or tag in (".", ".."):
        raise ValueError(f"not an Ollama model name: {name!r} (expected NAME[:TAG], e.g. deepseek-r1:8b)")
    full = [OLLAMA_REGISTRY, "library"][:3 - len(parts)] + parts
    return models.joinpath("manifests", *full, tag or "latest")


def _pulled(models: Path) -> list[str]:
    """The names the manifests directory holds (for the error message)."""
    root = models / "manifests"
    found = [p.relative_to(root).parts for p in root.glob("*/*/*/*") if p.is_file()]
    return sorted(f"{m}:{t}" if (r, n) == (OLLAMA_REGISTRY, "library") else f"{r}/{n}/{m}:{t}" for r, n, m, t in found)


def resolve_ollama(name: str) -> Path:
    """The GGUF blob of a model pulled by Ollama."""
    models = ollama_models_dir()
    manifest = ollama_manifest(name, models)
    if not manifest.is_file():
        pulled = _pulled(models)
        known = f"pulled: {', '.join(pulled)}" if pulled else "no models pulled there"
        raise FileNotFoundError(f"Ollama model {name!r} not found in {models} ({known}; set OLLAMA_MODELS "
                                "if Ollama keeps its models elsewhere)")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
    except (ValueError, KeyError, TypeError, StopIteration):
        raise ValueError(f"{manifest} is not an Ollama manifest with a model layer") from None
    algorithm, _, hexdigest = digest.partition(":")
    if not hexdigest or not hexdigest.isalnum():
        raise ValueError(f"{manifest}: bad model layer digest {digest!r}")
    blob = models / "blobs" / f"{algorithm}-{hexdigest}"
    if not blob.is_file():
        raise FileNotFoundError(f"Ollama model {name!r}: its blob {blob} is missing (pull it again)")
    return blob


def resolve_model(source: str | os.PathLike) -> Path:
    """A model directory, a GGUF file, or `ollama:NAME[:TAG]` -> the path to read."""
    text = os.fspath(source)
    if isinstance(text, str) and text.startswith(OLLAMA_PREFIX):
        return resolve_ollama(text[len(OLLAMA_PREFIX):])
    return Path(text)


def is_gguf(path: Path) -> bool:
    """A GGUF file (by its magic bytes: Ollama's blobs have no extension)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of a GGUF file: its name, GGML type, ggml dims (fastest first) and data offset in the file."""

    name: str
    ggml_type: int
    dims: tuple[int, ...]
    offset: int


class _Header:
    """A cursor over a GGUF header's bytes."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value[0]

    def string(self) -> str:
        n = self.take("<Q")
        if self.at + n > len(self.data):
            raise IndexError("header truncated")
        text = self.data[self.at:self.at + n].decode("utf-8", errors="replace")
        self.at += n
        return text

    def value(self, kind: int) -> Any:
        if kind == GGUF_STRING:
            return self.string()
        if kind == GGUF_ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item == GGUF_STRING:
                return [self.string() for _ in range(count)]
            if item == GGUF_ARRAY:
                return [self.value(self.take("<I")) for _ in range(count)]
            if item not in GGUF_SCALARS:
                raise ValueError(f"unknown GGUF array type {item}")
            dtype = np.dtype("<" + GGUF_SCALARS[item])
            if self.at + count * dtype.itemsize > len(self.data):
                raise IndexError("header truncated")
            values = np.frombuffer(self.data, dtype, count, self.at)
            self.at += values.nbytes
            return values.tolist()
        if kind not in GGUF_SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.take("<" + GGUF_SCALARS[kind])


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo], int]:
    """(metadata, tensor table, offset of the tensor data) of a GGUF file (version 2 or 3, little-endian)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(min(size, 1 << 20))
        while True:  # the header is read in growing pieces until it parses (a large vocabulary: tens of MB)
            try:
                return _parse_header(data, path)
            except (struct.error, IndexError) as e:  # truncated: read more, if there is more
                if len(data) >= size:
                    raise ValueError(f"{path} is not a GGUF file seekling can read (its header ends early: {e})") \
                        from None
                data += f.read(len(data))


def _parse_header(data: bytes, path: Path) -> tuple[dict[str, Any], list[TensorInfo], int]:
    h = _Header(data)
    if h.data[:4] != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    h.at = 4
    version = h.take("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} (seekling reads 2 and 3, little-endian)")
    n_tensors, n_keys = h.take("<Q"), h.take("<Q")
    metadata = {}
    for _ in range(n_keys):
        key = h.string()
        metadata[key] = h.value(h.take("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = h.string()
        dims = tuple(h.take("<Q") for _ in range(h.take("<I")))
        tensors.append(TensorInfo(name, h.take("<I"), dims, h.take("<Q")))
    if h.at > len(data):
        raise IndexError("header truncated")
    alignment = int(metadata.get("general.alignment", 32))
    return metadata, tensors, -(-h.at // alignment) * alignment
