"""seekling: a small, open, DeepSeek-style LLM system.

    import seekling
    model = seekling.load_pretrained("runs/speedrun/rl")
    tok = seekling.load_tokenizer("runs/speedrun/rl")
    engine = seekling.Engine("runs/speedrun/rl")
    out = engine.generate(["What is 123 + 989?"], seekling.SamplingParams(temperature=0.6))[0]
"""

from __future__ import annotations

from seekling.engine import Engine, SamplingParams
from seekling.model.config import ModelConfig, preset
from seekling.model.load import load_pretrained
from seekling.tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["Engine", "ModelConfig", "SamplingParams", "load_pretrained", "load_tokenizer", "preset"]
