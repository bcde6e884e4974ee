"""The inference engine: latent KV cache, continuous batching, sampling, streaming, MTP speculation."""

from seekling.engine.engine import CompletionOutput, Delta, Engine, RequestOutput
from seekling.engine.sampling import SamplingParams

__all__ = ["CompletionOutput", "Delta", "Engine", "RequestOutput", "SamplingParams"]
