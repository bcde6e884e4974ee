"""The DeepSeek-V3 model (MLA, DeepSeekMoE, MTP), and the dense Qwen2/Llama decoder of the R1 distills."""

from seekling.model.dense import DenseModel, load_dense
from seekling.model.model import ModelOutput, Transformer
from seekling.model.quant import quantize_int8

__all__ = ["DenseModel", "ModelOutput", "Transformer", "load_dense", "quantize_int8"]
