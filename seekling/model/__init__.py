"""The DeepSeek-V3 model (MLA, DeepSeekMoE, MTP)."""

from seekling.model.model import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
