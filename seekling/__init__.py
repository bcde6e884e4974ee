"""seekling: a small, open, DeepSeek-style LLM system.

    import seekling
    model = seekling.load_pretrained("runs/speedrun/rl")
    tok = seekling.load_tokenizer("runs/speedrun/rl")
    engine = seekling.Engine("runs/speedrun/rl")
    out = engine.generate(["What is 123 + 989?"], seekling.SamplingParams(temperature=0.6))[0]
"""

from __future__ import annotations

from typing import Any

from seekling.checkpoint import load_pretrained
from seekling.config import ModelConfig, preset

__version__ = "0.1.0"
__all__ = ["Engine", "ModelConfig", "SamplingParams", "load_pretrained", "load_tokenizer", "preset"]


def load_tokenizer(directory: str) -> Any:
    from seekling.tokenizer import load_tokenizer as _load

    return _load(directory)


def __getattr__(name: str) -> Any:
    # The engine pulls in more than a training script needs; import it on first use.
    if name in ("Engine", "SamplingParams"):
        from seekling import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'seekling' has no attribute {name!r}")
