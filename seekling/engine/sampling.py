"""SamplingParams (vLLM's field names), the batched logits processor and the sampler.

The processor turns raw logits into the distribution a request samples from, in vLLM's order:
penalties (repetition over prompt+output as HF/vLLM define it, presence/frequency over the output),
temperature, then the truncations top-k, top-p, min-p. Greedy (temperature 0) is a one-hot
distribution on the argmax, so speculative decoding treats greedy and sampled requests alike.
Seeded requests sample with their own `torch.Generator`, row by row, so their draws depend on
nothing but the seed and their own logits (not on which other requests share the batch).

`SamplingParams.structured_outputs` (vLLM's `StructuredOutputsParams`) is the request's contract with
constrained decoding; see that class for exactly which text a constraint covers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's class and field names); exactly one field is set.

    What a constraint covers, for every field: the completion text exactly as the engine decodes the
    sampled tokens (special tokens kept, nothing stripped), from the first generated token to the end.
    Once the text is complete for the constraint, only an end of sequence may follow (eos, or a stop
    string/token). A length cut (`max_tokens`) is the one way a constrained completion ends unfinished.
    A prompt that opens a think block is not special-cased by the engine: a constraint that must let the
    model reason first says so itself (the server's structural tags begin with the reasoning block).

    - `json`: a JSON Schema (dict, or its JSON text); the completion is one JSON value valid against it.
    - `json_object`: the completion is one JSON object (any keys): `{"type": "object"}`.
    - `regex`: the completion matches the regular expression in full.
    - `choice`: the completion is exactly one of these strings.
    - `grammar`: an EBNF grammar (GBNF / xgrammar syntax, root rule `root`).
    - `structural_tag`: JSON text of an xgrammar structural tag, `{"type": "structural_tag", "format":
      {...}}` with formats const_string, json_schema, any_text, sequence, or, tag (begin / content /
      end), tags_with_separator. The server builds these for tool calls and for `response_format` when
      the model reasons first (seekling/serve/tools.py); xgrammar's `Grammar.from_structural_tag`
      compiles them as they are.
    """

    json: dict[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("StructuredOutputsParams needs exactly one of json, json_object, regex, choice, "
                             f"grammar, structural_tag; got {given or 'none'}")
        if self.json_object not in (None, True, False):
            raise ValueError(f"json_object must be a bool, got {self.json_object!r}")
        if isinstance(self.json, str):
            self.json = _json_text(self.json, "json")
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"json must be a JSON Schema (a dict or its JSON text), got {type(self.json).__name__}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except (re.error, TypeError) as e:
                raise ValueError(f"regex does not compile: {e}") from e
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or any(not isinstance(c, str) for c in self.choice)):
            raise ValueError(f"choice must be a non-empty list of strings, got {self.choice!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("grammar must be a non-empty EBNF string")
        if self.structural_tag is not None:
            tag = _json_text(self.structural_tag, "structural_tag")
            if not isinstance(tag, dict) or tag.get("type") != "structural_tag" or "format" not in tag:
                raise ValueError('structural_tag must be JSON of {"type": "structural_tag", "format": {...}}')


def _json_text(text: Any, name: str) -> Any:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be JSON text, got {type(text).__name__}")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise ValueError(f"{name} is not valid JSON: {e}") from e


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the model's context length
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives to return beside the chosen token
    ignore_eos: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (see the class)
    detokenize: bool = True  # False: token ids only, no text (RL rollouts decode their completions themselves)
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.n, int) or self.n < 1:
            problems.append(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            problems.append(f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            problems.append(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            problems.append(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            problems.append(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            problems.append(f"logprobs must be an integer >= 0 or None, got {self.logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed must be an integer or None, got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            problems.append(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids or []):
            problems.append(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.detokenize is False and stop:
            problems.append("stop strings need detokenize=True")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            problems.append("structured_outputs must be a StructuredOutputsParams, got "
                            f"{type(self.structured_outputs).__name__}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))
        self.stop_list = stop

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: the token is the argmax of the raw logits (no distribution needed)."""
        return (self.temperature == 0 and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> torch.Tensor:
    """logits [B, V]. Repetition penalty (HF/vLLM): for every token seen in prompt or output, divide a
    positive logit by the penalty and multiply a negative one. Presence/frequency (OpenAI): subtract
    presence * [count > 0] + frequency * count, counts over the generated tokens only."""
    logits = logits.clone()
    V = logits.shape[-1]
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompts[i]) | set(outputs[i])), dtype=torch.long,
                                device=logits.device)
            if len(seen):
                row = logits[i, seen]
                logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and outputs[i]:
            counts = torch.bincount(torch.tensor(outputs[i], device=logits.device), minlength=V)[:V]
            counts = counts.to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def probs_from_logits(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                      outputs: list[list[int]]) -> torch.Tensor:
    """The distribution [B, V] (fp32) each row samples from, after penalties, temperature and truncation."""
    logits = apply_penalties(logits.float(), params, prompts, outputs)
    B, V = logits.shape
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
    logits = logits / temps.unsqueeze(1)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=logits.device).clamp(max=V)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    min_p = torch.tensor([p.min_p for p in params], device=logits.device)
    if (top_k < V).any() or (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=logits.device).expand(B, V)
        drop = rank >= top_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        # top-p: keep the smallest prefix whose mass reaches top_p (the token crossing it is kept).
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p.unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    if (min_p > 0).any():
        keep = probs >= min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    if greedy.any():
        one_hot = torch.zeros_like(probs).scatter(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
    return probs


def sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row [B]; rows with a generator draw from it alone (reproducible per seed).
    One-hot rows (greedy) take their argmax without drawing."""
    out = probs.argmax(-1)
    random = (probs.max(-1).values < 1).tolist()
    shared = [i for i, g in enumerate(generators) if g is None and random[i]]
    if shared:
        out[shared] = torch.multinomial(probs[shared], 1).squeeze(1)
    for i, g in enumerate(generators):
        if g is not None and random[i]:
            out[i] = torch.multinomial(probs[i], 1, generator=g).item()
    return out


def uniform(generator: torch.Generator | None) -> float:
    """A U(0,1) draw from the request's own generator (the accept test of speculative sampling)."""
    return torch.rand((), generator=generator).item()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[dict[int, float]]:
    """Log-probabilities (raw model distribution, as vLLM returns) of the chosen token and the top-k
    alternatives, per row: {token_id: logprob}, the chosen token first."""
    lp = logits.float().log_softmax(-1)
    out = []
    top = lp.topk(k, dim=-1) if k > 0 else None
    for i in range(lp.shape[0]):
        d = {int(tokens[i]): float(lp[i, tokens[i]])}
        if top is not None:
            for v, t in zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True):
                d.setdefault(t, v)
        out.append(d)
    return out
