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
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's class and field names); exactly one field is set.

    What a constraint covers, for every field: the completion text exactly as the engine decodes the
    sampled tokens (special tokens kept, nothing stripped), from the first generated token to the end.
    The chat template's tokens (the tokenizer's added tokens) never stand for a constraint's text, except
    where a structural tag writes them in its begin/end/separator/const strings: a JSON string never holds
    `<｜User｜>` or `</think>` (seekling/engine/grammar.py).
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


# Below this a temperature is raised to it (as vLLM does): logits / 1e-30 overflow to inf, and one row of NaN
# probabilities would fail the whole batch's draw.
MIN_TEMPERATURE = 1e-2
# Bounds that keep every row of the batch finite: logits (|x| < ~1e3) times or over these stay far from fp32's range.
REPETITION_PENALTY = (1e-2, 1e2)
LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes (each sample seeds seed + index, mod 2**64)


def _number(value: Any, integer: bool = False) -> bool:
    """A real number (finite, not a bool), or an integer when `integer`."""
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _in(value: Any, low: float, high: float, integer: bool = False) -> bool:
    return _number(value, integer) and low <= value <= high


@dataclass
class SamplingParams:
    """A request's sampling, with vLLM's names. Every value is checked here, before it can reach the shared batch:
    a value the sampler could not hold (NaN, an infinite or out-of-range number) raises ValueError, and values past
    a bound that changes nothing are clamped (top_k past the vocabulary, a temperature below MIN_TEMPERATURE)."""

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
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] (OpenAI's)
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (see the class)
    detokenize: bool = True  # False: token ids only, no text (RL rollouts decode their completions themselves)
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE

    def _problems(self) -> list[str]:
        problems = []
        if not _in(self.n, 1, math.inf, integer=True):
            problems.append(f"n must be an integer >= 1, got {self.n!r}")
        if not _in(self.temperature, 0, math.inf):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _in(self.top_k, -1, math.inf, integer=True):
            problems.append(f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not _in(self.min_p, 0, 1):
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _in(getattr(self, name), -2, 2):
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not _in(self.repetition_penalty, *REPETITION_PENALTY):
            problems.append(f"repetition_penalty must be in [{REPETITION_PENALTY[0]:g}, {REPETITION_PENALTY[1]:g}], "
                            f"got {self.repetition_penalty!r}")
        if self.max_tokens is not None and not _in(self.max_tokens, 1, math.inf, integer=True):
            problems.append(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if self.logprobs is not None and not _in(self.logprobs, 0, math.inf, integer=True):
            problems.append(f"logprobs must be an integer >= 0 or None, got {self.logprobs!r}")
        if self.seed is not None and not _in(self.seed, *SEED_RANGE, integer=True):
            problems.append(f"seed must be an integer in [-2**63, 2**64 - 1] or None, got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
            problems.append(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if any(not _in(t, 0, math.inf, integer=True) for t in self.stop_token_ids or []):
            problems.append(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.detokenize is False and stop:
            problems.append("stop strings need detokenize=True")
        if self.logit_bias is not None and (not isinstance(self.logit_bias, dict) or any(
                not _in(t, 0, math.inf, integer=True) or not _in(b, -LOGIT_BIAS, LOGIT_BIAS)
                for t, b in self.logit_bias.items())):
            problems.append(f"logit_bias must map token ids (integers >= 0) to numbers in [-{LOGIT_BIAS:g}, "
                            f"{LOGIT_BIAS:g}], got {self.logit_bias!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            problems.append("structured_outputs must be a StructuredOutputsParams, got "
                            f"{type(self.structured_outputs).__name__}")
        return problems

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: the token is the argmax of the raw logits (no distribution needed)."""
        return (self.temperature == 0 and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> torch.Tensor:
    """logits [B, V]. Logit bias (OpenAI): added to the listed tokens' logits (ids past V are ignored). Repetition
    penalty (HF/vLLM): for every token seen in prompt or output, divide a positive logit by the penalty and
    multiply a negative one. Presence/frequency (OpenAI): subtract presence * [count > 0] + frequency * count,
    counts over the generated tokens only."""
    logits = logits.clone()
    V = logits.shape[-1]
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < V]
            logits[i, ids] += torch.tensor([float(p.logit_bias[t]) for t in ids], dtype=logits.dtype,
                                           device=logits.device)
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
    top_k = torch.tensor([min(p.top_k, V) if p.top_k > 0 else V for p in params], device=logits.device)
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
    One-hot rows (greedy) take their argmax without drawing. A row that is not a distribution (NaN: every token
    masked, or a logit overflowed) raises ValueError rather than yielding an arbitrary token."""
    if not torch.isfinite(probs).all():
        raise ValueError("the next-token distribution is not finite (NaN or inf): nothing can be sampled from it")
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
    top = lp.topk(min(k, lp.shape[-1]), dim=-1) if k > 0 else None
    for i in range(lp.shape[0]):
        d = {int(tokens[i]): float(lp[i, tokens[i]])}
        if top is not None:
            for v, t in zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True):
                d.setdefault(t, v)
        out.append(d)
    return out
