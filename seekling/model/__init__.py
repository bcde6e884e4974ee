"""The models: DeepSeek-V3/V2 (`Transformer`) and the dense Qwen2/Qwen3/Llama decoders (`DenseModel`), their
shared layers and the inference interface the engine calls (layers.py), the family registry (families/),
int8 weights and CPU kernels (quant.py), and loading a directory, GGUF file or Ollama model (load.py)."""

from seekling.model.dense import DenseModel
from seekling.model.layers import Batch, CausalLM, make_batch
from seekling.model.load import load_pretrained
from seekling.model.model import ModelOutput, Transformer

__all__ = ["Batch", "CausalLM", "DenseModel", "ModelOutput", "Transformer", "load_pretrained", "make_batch"]
