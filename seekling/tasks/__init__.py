"""Verifiable task families: a generator, a solver that writes a step-by-step trace, and a verifier.

    TASKS["addition"].generate(random.Random(0), difficulty=2) -> Problem
    TASKS["addition"].score(problem, completion) -> 1.0 / 0.0
    sample_problems("word", 100, split="test")  # held-out problems, disjoint from "train"
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ..tokenizer import render_chat
from .arithmetic import Addition, Multiplication
from .base import Problem, TaskFamily, extract_answer, format_answer, split_of
from .countdown import Countdown
from .word import WordProblems

TASKS: dict[str, TaskFamily] = {
    f.name: f for f in (Addition(), Multiplication(), WordProblems(), Countdown())
}

__all__ = ["TASKS", "Problem", "TaskFamily", "corpus_text", "extract_answer", "format_answer",
           "sample_problems", "split_of"]


def sample_problems(task: str, n: int, split: str = "train", difficulty: int | None = None,
                    seed: int = 0) -> list[Problem]:
    """n problems of one split, deterministic in (task, split, difficulty, seed). Problems whose question
    hashes to the other split are rejected, so train and test never share a question. With
    difficulty=None the levels are mixed uniformly. The test split has no repeats (an eval set of
    distinct problems); the train split is a stream and may repeat a question."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    family = TASKS[task]
    if difficulty is not None and difficulty not in family.levels:
        raise ValueError(f"{task}: difficulty must be one of {family.levels}, got {difficulty!r}")
    rng = random.Random(f"{task}/{split}/{difficulty}/{seed}")  # str seeds are hashed stably (sha512)
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 100 * n + 1000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could only find {len(problems)} distinct {split} problems of {task} "
                             f"(difficulty {difficulty}); ask for fewer")
        problem = family.generate(rng, difficulty if difficulty is not None else rng.choice(family.levels))
        if split_of(task, problem.question) != split:
            continue
        if split == "test":
            if problem.question in seen:
                continue
            seen.add(problem.question)
        problems.append(problem)
    return problems


def corpus_text(n_per_task: int, seed: int = 0, with_trace: bool = True) -> Iterator[str]:
    """Full chat-rendered SFT samples of training problems (bos ... eos, DeepSeek-R1 format), all levels
    mixed, the tasks interleaved so any prefix of the stream is balanced. For tokenizer training and
    pretraining text."""
    per_task = [sample_problems(task, n_per_task, "train", None, seed) for task in TASKS]
    for group in zip(*per_task, strict=True):
        for problem in group:
            yield render_chat(problem.messages(with_trace), add_generation_prompt=False)
