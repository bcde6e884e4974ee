"""Where a model comes from: a model directory (Hugging Face layout), a GGUF file, or a model pulled by Ollama.

    resolve_model("runs/speedrun/rl")      -> the directory
    resolve_model("model.gguf")            -> the file
    resolve_model("ollama:deepseek-r1:8b") -> ~/.ollama/models/blobs/sha256-... (a GGUF file)

Ollama keeps a pulled model as content-addressed blobs plus one manifest per name and tag:
`$OLLAMA_MODELS` (default `~/.ollama/models`) / manifests / <registry> / <namespace> / <model> / <tag>, a JSON
document whose layer of media type `application/vnd.ollama.image.model` names the GGUF blob by digest
(`sha256:<hex>`, stored as blobs/sha256-<hex>). A bare name is `registry.ollama.ai/library/<model>:latest`.
This module reads files only (no torch), so the tokenizer loader uses it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

OLLAMA_PREFIX = "ollama:"
OLLAMA_REGISTRY = "registry.ollama.ai"
MODEL_LAYER = "application/vnd.ollama.image.model"
GGUF_MAGIC = b"GGUF"


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
