"""What goes into the engine and what comes out: the model and its tokenizer, prompts (token ids, text or chat
messages, tokenised once, here), the checks a request passes before it is queued, and the outputs (`Delta` per
step, `RequestOutput` per request)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seekling.engine.detok import prompt_opens_think
from seekling.engine.sampling import SamplingParams
from seekling.model.layers import CausalLM
from seekling.model.load import QUANTIZE, load_pretrained, release_freed_memory
from seekling.tokenizer import bundled_tokenizer

Prompt = str | list[dict[str, Any]] | list[int]
THINK_TAIL = 8  # prompt tokens decoded to tell whether a token-id prompt opens a think block


@dataclass
class Delta:
    index: int  # which of the request's n samples
    text: str
    reasoning: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's cached_tokens)
    error: str | None = None  # with finish_reason "error": what failed (the other requests went on)


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None  # finish_reason "error": why

    def absorb(self, d: Delta) -> None:
        self.text += d.text
        self.reasoning += d.reasoning
        self.token_ids += d.token_ids
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs
        if d.finish_reason is not None:
            self.finish_reason, self.error = d.finish_reason, d.error


@dataclass
class RequestOutput:
    request_id: str
    prompt: Prompt
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (the first sample's)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def reasoning(self) -> str:
        return self.outputs[0].reasoning

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def load_model(model_or_path: torch.nn.Module | str | Path, tokenizer: Any, device: str | torch.device | None,
               dtype: str | torch.dtype | None, quantize: str | None, max_memory_gb: float | None,
               ) -> tuple[CausalLM, Any]:
    """The model (loaded from a directory, or the object given) and its tokenizer."""
    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"unknown quantize={quantize!r}: {', '.join(QUANTIZE)} (or None)")
    if quantize is not None and device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs seekling's CPU kernels; on a GPU run bf16 (dtype='bfloat16')")
    if isinstance(model_or_path, (str, Path)):
        model = load_pretrained(model_or_path, device=device, dtype=dtype, max_memory_gb=max_memory_gb,
                                quantize=quantize)
        if tokenizer is None:
            tokenizer = bundled_tokenizer(model_or_path)
            release_freed_memory()
    elif dtype is not None or max_memory_gb is not None:
        raise ValueError("dtype and max_memory_gb apply when the engine loads a directory; convert a model object "
                         "yourself")
    else:
        model = model_or_path
    if not isinstance(model, CausalLM):
        raise ValueError(f"the engine runs seekling's model families (seekling/model/families/: a Transformer "
                         f"or DenseModel), got {type(model).__name__}")
    return model, tokenizer


def encode_prompt(prompt: Prompt, tokenizer: Any, prompt_ids: list[int] | None = None) -> tuple[list[int], bool]:
    """(token ids, whether the prompt opens a think block). Token ids pass as they are, and so do `prompt_ids`
    given with a text prompt (a server tokenises once, when it renders the chat); of an id prompt only the last
    few are decoded, to see whether they open <think>."""
    tok = tokenizer
    if isinstance(prompt, str) and prompt_ids is not None:
        return list(prompt_ids), prompt_opens_think(prompt)
    if isinstance(prompt, str):
        if tok is None:
            raise ValueError("a text prompt needs a tokenizer (pass token ids, or Engine(model, tok))")
        return tok.encode(prompt), prompt_opens_think(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        if tok is None:
            raise ValueError("a chat prompt needs a tokenizer")
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tok.encode(text), prompt_opens_think(text)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        opens = tok is not None and bool(prompt) and prompt_opens_think(tok.decode(prompt[-THINK_TAIL:]))
        return list(prompt), opens
    raise ValueError("a prompt is a string, a list of chat messages ({'role', 'content'}) or a list of "
                     f"token ids; got {type(prompt).__name__}")


def check_request(ids: list[int], params: SamplingParams, *, vocab_size: int, max_model_len: int,
                  max_num_seqs: int, has_tokenizer: bool, cache_slots: int, extra_slots: int) -> None:
    """ValueError for a request the engine could never serve (checked before it is queued)."""
    if not ids:
        raise ValueError("the prompt is empty")
    if any(t < 0 or t >= vocab_size for t in ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {max_model_len}")
    if any(t >= vocab_size for t in (*(params.stop_token_ids or ()), *(params.logit_bias or ()))):
        raise ValueError(f"stop_token_ids and logit_bias take token ids in [0, {vocab_size})")
    if params.stop_list and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer")
    if params.n > max_num_seqs:
        raise ValueError(f"n={params.n} exceeds max_num_seqs={max_num_seqs}")
    longest = min(len(ids) + (params.max_tokens or max_model_len), max_model_len) + extra_slots
    if longest > cache_slots:
        raise ValueError(f"the request needs up to {longest} cache slots but the cache holds {cache_slots}: it "
                         "can never fit (lower max_tokens or enlarge the cache)")
