"""Verifiable rewards for GRPO: accuracy (the task's verifier), format, DAPO's overlong penalty, and a
user's own reward function, combined with weights.

A completion is the text the policy generated after the prompt. With the R1 chat template the prompt
already ends with `<think>\n`, so a well-formed completion is `reasoning</think>\n\nanswer`; with the
R1-Zero template (a plain-text prompt ending in "Assistant:") it is `<think>reasoning</think>
<answer>answer</answer>`.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from seekling.data import iter_jsonl

THINK_END = "</think>"
_R1_ZERO_FORMAT = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)

# DeepSeek-R1 paper, Table 1 (the R1-Zero template); {question} is replaced by the problem.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {question}. Assistant:"
)

RewardFn = Callable[..., float]


def split_completion(completion: str, template: str = "r1") -> tuple[str, str] | None:
    """(reasoning, answer) of a well-formed completion, or None when the format is broken.

    r1: exactly one `</think>` (the prompt opened the think block, so no `<think>` may appear), and
    non-empty reasoning and answer. r1-zero: `<think>...</think>` then `<answer>...</answer>`, nothing
    else, both non-empty.
    """
    if template == "r1":
        if completion.count(THINK_END) != 1 or "<think>" in completion:
            return None
        reasoning, answer = completion.split(THINK_END)
    elif template == "r1-zero":
        m = _R1_ZERO_FORMAT.match(completion)
        if m is None or "<think>" in m.group(1) or "<answer>" in m.group(2):
            return None
        reasoning, answer = m.group(1), m.group(2)
    else:
        raise ValueError(f"unknown template {template!r}: use 'r1' or 'r1-zero'")
    reasoning, answer = reasoning.strip(), answer.strip()
    if not reasoning or not answer:
        return None
    return reasoning, answer


def answer_text(completion: str, template: str = "r1") -> str | None:
    """The answer part the verifier should see, or None if there is none (unclosed think block etc.).
    Lenient on purpose (empty reasoning is fine): accuracy and format are separate rewards."""
    if template == "r1":
        if THINK_END not in completion:
            return None
        answer = completion.split(THINK_END)[-1]
    elif template == "r1-zero":
        m = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
        if m is None:
            return None
        answer = m.group(1)
    else:
        raise ValueError(f"unknown template {template!r}: use 'r1' or 'r1-zero'")
    answer = answer.strip()
    return answer or None


def format_reward(completion: str, template: str = "r1",
                  answer_ok: Callable[[str], bool] | None = None) -> float:
    """1.0 for a well-formed completion whose answer the task can parse (`answer_ok`), else 0.0."""
    parts = split_completion(completion, template)
    if parts is None:
        return 0.0
    return 1.0 if answer_ok is None or answer_ok(parts[1]) else 0.0


def accuracy_reward(problem: Any, completion: str, template: str = "r1") -> float:
    """The task verifier's score of the answer part (0.0 when there is no answer part)."""
    from seekling.tasks import TASKS, extract_answer, format_answer

    answer = answer_text(completion, template)
    if answer is None:
        return 0.0
    if problem.task not in TASKS:
        raise ValueError(f"unknown task {problem.task!r}; known: {sorted(TASKS)}")
    if template == "r1-zero" and extract_answer(answer) is None:
        answer = format_answer(answer)  # R1-Zero's <answer> tags delimit the answer; the verifiers read \boxed{}
    return float(TASKS[problem.task].score(problem, answer))


def overlong_penalty(n_tokens: int, max_tokens: int, cache: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_tokens - cache, then a linear ramp down to -1 at
    max_tokens (and -1 beyond)."""
    if cache <= 0 or cache > max_tokens:
        raise ValueError(f"overlong cache must be in [1, max_tokens={max_tokens}], got {cache}")
    free = max_tokens - cache
    if n_tokens <= free:
        return 0.0
    return max(-1.0, (free - n_tokens) / cache)


def load_reward_fn(spec: str) -> RewardFn:
    """`module:function` or `path/to/file.py:function` -> the callable `fn(prompt, completion, **sample)`."""
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise ValueError(f"reward function {spec!r} must look like 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"reward module file not found: {path}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{fn_name!r} in {module_name!r} is not a callable")
    return fn


def load_prompts_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """A user's prompts: one JSON object a line with "prompt" (text) or "messages" (chat messages), plus
    any fields the reward function takes as keyword arguments."""
    rows = []
    for i, row in iter_jsonl(path):
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
            raise ValueError(f"{path}:{i}: each line needs exactly one of 'prompt' or 'messages'")
        if "prompt" in row and not isinstance(row["prompt"], str):
            raise ValueError(f"{path}:{i}: 'prompt' must be a string")
        if "messages" in row and not (isinstance(row["messages"], list) and row["messages"]):
            raise ValueError(f"{path}:{i}: 'messages' must be a non-empty list of chat messages")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def compute_rewards(samples: Sequence[dict[str, Any]], completions: Sequence[str], n_tokens: Sequence[int],
                    weights: dict[str, float], template: str = "r1", custom_fn: RewardFn | None = None,
                    max_tokens: int = 0, overlong_cache: int = 0,
                    answer_ok: Callable[[str], bool] | None = None) -> dict[str, list[float]]:
    """Every weighted reward of each completion, and their weighted sum under "total".

    A sample is a dict: "problem" (a tasks.Problem, for accuracy) or "prompt"/"messages" plus the user's
    fields (for `custom_fn`). Rewards with weight 0 are not computed.
    """
    known = {"accuracy", "format", "overlong", "custom"}
    if set(weights) - known:
        raise ValueError(f"unknown reward names {sorted(set(weights) - known)}; known: {sorted(known)}")
    out: dict[str, list[float]] = {}
    for name, w in weights.items():
        if w == 0:
            continue
        if name == "accuracy":
            out[name] = [accuracy_reward(s["problem"], c, template) if s.get("problem") is not None else 0.0
                         for s, c in zip(samples, completions, strict=True)]
        elif name == "format":
            out[name] = [format_reward(c, template, answer_ok) for c in completions]
        elif name == "overlong":
            out[name] = [overlong_penalty(n, max_tokens, overlong_cache) for n in n_tokens]
        elif name == "custom":
            if custom_fn is None:
                raise ValueError("a 'custom' reward weight needs a reward function (module:function)")
            out[name] = []
            for s, c in zip(samples, completions, strict=True):
                fields = {k: v for k, v in s.items() if k not in ("prompt", "messages", "problem")}
                r = custom_fn(s.get("prompt", s.get("messages")), c, **fields)
                if not isinstance(r, (int, float)):
                    raise TypeError(f"reward function returned {type(r).__name__}, expected a float")
                out[name].append(float(r))
    out["total"] = [sum(weights[k] * out[k][i] for k in out) for i in range(len(completions))]
    return out
