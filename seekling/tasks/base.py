"""What every task family shares: the Problem record, the answer format and its extraction, the
train/test split rule and the default exact-match scorer."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

THINK_END = "</think>"
_BOXED = "\\boxed{"


@dataclass(frozen=True)
class Problem:
    task: str
    difficulty: int
    question: str
    answer: str  # the canonical final answer, unformatted ("42")
    trace: str  # the solver's step-by-step reasoning

    def messages(self, with_trace: bool = True) -> list[dict[str, str]]:
        """Chat messages for SFT; without the trace the template renders an empty think block."""
        assistant = {"role": "assistant", "content": format_answer(self.answer)}
        if with_trace:
            assistant["reasoning_content"] = self.trace
        return [{"role": "user", "content": self.question}, assistant]


def format_answer(answer: str) -> str:
    """The one way a final answer is written after the think block (DeepSeek-R1's math convention)."""
    return f"{_BOXED}{answer}}}"


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the last \\boxed{...} after </think> (or anywhere, without a think
    block), with nested braces matched; None when there is none or it is unclosed."""
    text = completion.rsplit(THINK_END, 1)[-1]
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def normalize_number(text: str) -> int | None:
    """An integer written by a model ("1,234", " -7 ", "42."), or None if it is not one."""
    text = text.replace(",", "").replace(" ", "").replace("\u2212", "-").rstrip(".")
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else None


def split_of(task: str, question: str) -> str:
    """'test' for ~10% of questions, chosen by a stable hash of the canonical question, else 'train'.
    Generators reject problems of the other split, so the two are disjoint by construction."""
    digest = hashlib.sha256(f"{task}\n{question}".encode()).digest()
    return "test" if digest[0] % 10 == 0 else "train"


class TaskFamily:
    """A family of generated problems. Subclasses set `name`, `levels` and implement `make`."""

    name: str = ""
    levels: tuple[int, ...] = (1, 2, 3)

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        raise NotImplementedError

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        if difficulty not in self.levels:
            raise ValueError(f"{self.name}: difficulty must be one of {self.levels}, got {difficulty!r}")
        return self.make(rng, difficulty)

    def score(self, problem: Problem, completion: str) -> float:
        """1.0 when the extracted final answer equals the problem's integer answer, else 0.0."""
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        value = normalize_number(answer)
        return 1.0 if value is not None and value == int(problem.answer) else 0.0
