import random
import re
import statistics

import pytest

from seekling.tasks import (
    TASKS,
    Problem,
    corpus_text,
    extract_answer,
    format_answer,
    sample_problems,
    split_of,
)
from seekling.tasks.arithmetic import add_lines, sub_lines
from seekling.tasks.countdown import evaluate, parse_question, solve
from seekling.tokenizer import ASSISTANT, BOS, EOS, USER

N_PER_LEVEL = 150


def _problems(task: str, difficulty: int, n: int = N_PER_LEVEL, seed: int = 0) -> list[Problem]:
    rng = random.Random(seed)
    return [TASKS[task].generate(rng, difficulty) for _ in range(n)]


def _check_trace_arithmetic(trace: str) -> int:
    """Recompute every 'x op y [op z]=r' in a trace and every borrow's '=-t, +10=u'; returns how many."""
    checked = 0
    for m in re.finditer(r"(?<![\d)])(\d+(?:[-+*/]\d+)+)=(-?\d+)", trace):
        terms = re.findall(r"[-+*/]?\d+", m.group(1))
        value = int(terms[0])
        for term in terms[1:]:
            op, n = term[0], int(term[1:])
            if op == "/":
                assert n > 0 and value % n == 0, m.group(0)
                value //= n
            else:
                value = {"+": value + n, "-": value - n, "*": value * n}[op]
        assert value == int(m.group(2)), f"wrong step {m.group(0)!r} in\n{trace}"
        checked += 1
    for m in re.finditer(r"=(-\d+), \+10=(\d+)", trace):
        assert int(m.group(1)) + 10 == int(m.group(2))
        checked += 1
    return checked


def test_families_and_levels():
    assert set(TASKS) >= {"addition", "multiplication", "word", "countdown"}
    for name, family in TASKS.items():
        assert family.name == name
        assert list(family.levels) == sorted(family.levels) and len(family.levels) >= 3
        with pytest.raises(ValueError, match="difficulty"):
            family.generate(random.Random(0), 99)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_solver_answers_score_one_and_wrong_answers_zero(task):
    family = TASKS[task]
    for difficulty in family.levels:
        for p in _problems(task, difficulty):
            assert (p.task, p.difficulty) == (task, difficulty)
            assert p.question and p.trace and p.answer
            good = f"<think>\n{p.trace}\n</think>\n\n{format_answer(p.answer)}"
            assert family.score(p, good) == 1.0, p
            assert family.score(p, format_answer(p.answer)) == 1.0  # no think block: the whole text
            assert family.score(p, p.trace) == 0.0  # no boxed answer at all
            if task == "countdown":
                wrong = f"{p.answer}+1"
            else:
                wrong = str(int(p.answer) + random.Random(p.question).choice([-10, -1, 1, 7]))
            assert family.score(p, f"<think>{format_answer(p.answer)}</think> {format_answer(wrong)}") == 0.0
            # an answer inside the think block does not count once the think block is closed
            assert family.score(p, f"<think>{format_answer(p.answer)}</think> no idea") == 0.0


def test_extract_answer():
    assert extract_answer("x </think>\n\n\\boxed{42}") == "42"
    assert extract_answer("\\boxed{1} then \\boxed{ 2 }") == "2"
    assert extract_answer("\\boxed{(3+4)*{5}}") == "(3+4)*{5}"
    assert extract_answer("\\boxed{7") is None
    assert extract_answer("Answer: 7") is None
    assert extract_answer("<think>\\boxed{3}</think>") is None
    assert TASKS["addition"].score(Problem("addition", 1, "What is 1 + 2?", "3", ""), "\\boxed{3.}") == 1.0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_by_seed(task):
    for difficulty in TASKS[task].levels:
        assert _problems(task, difficulty, 30, seed=5) == _problems(task, difficulty, 30, seed=5)
        assert _problems(task, difficulty, 30, seed=5) != _problems(task, difficulty, 30, seed=6)
    assert sample_problems(task, 40, "test", seed=1) == sample_problems(task, 40, "test", seed=1)
    assert sample_problems(task, 40, "train", seed=1) != sample_problems(task, 40, "train", seed=2)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_trace_arithmetic_is_right(task):
    for difficulty in TASKS[task].levels:
        checked = sum(_check_trace_arithmetic(p.trace) for p in _problems(task, difficulty))
        assert checked >= N_PER_LEVEL  # at least one verified step per problem


def test_column_traces_write_the_answer_digits():
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randint(0, 10**rng.randint(1, 6)), rng.randint(0, 10**rng.randint(1, 6))
        written = re.findall(r"write (\d)", "\n".join(add_lines(a, b)))
        assert int("".join(reversed(written))) == a + b
        hi, lo = max(a, b), min(a, b)
        written = re.findall(r"write (\d)", "\n".join(sub_lines(hi, lo)))
        assert int("".join(reversed(written))) == hi - lo
    assert add_lines(487, 56) == ["7+6=13, write 3, carry 1", "8+5+1=14, write 4, carry 1",
                                  "4+0+1=5, write 5"]
    assert sub_lines(503, 27) == ["3-7=-4, +10=6, write 6, borrow 1", "0-2-1=-3, +10=7, write 7, borrow 1",
                                  "5-0-1=4, write 4"]


def test_word_and_multiplication_traces_end_at_the_answer():
    for p in _problems("word", 3, 100):
        assert re.findall(r"=(\d+)$", p.trace)[-1] == p.answer
        assert p.question.endswith("have now?") and p.trace.count("\n") >= 3  # one line per step, 3+ steps
    for p in _problems("multiplication", 3, 100):
        a, b = map(int, re.findall(r"\d+", p.question))
        assert p.trace.endswith(f"{a} * {b} = {a * b}") and p.answer == str(a * b)


def test_countdown_verifier():
    numbers = [25, 4, 3, 8]
    assert evaluate("25*4+3", numbers) == 103
    assert evaluate("(25*4)+3 = 103", numbers) == 103
    assert evaluate("25 × (8 − 4)", numbers) == 100
    assert evaluate("25*25", numbers) is None  # 25 used twice
    assert evaluate("25*7", numbers) is None  # 7 is not given
    assert evaluate("25/5", [25, 5]) is None  # division is not allowed
    assert evaluate("2**3", [2, 3]) is None
    assert evaluate("-3+8", numbers) is None  # unary minus is not an allowed operation
    assert evaluate("__import__('os')", numbers) is None
    assert evaluate("3.0*8", numbers) is None
    assert evaluate("25*4+", numbers) is None
    p = TASKS["countdown"].generate(random.Random(1), 3)
    nums, target = parse_question(p.question)
    assert evaluate(p.answer, nums) == target
    # any valid expression scores 1, not only the solver's
    q = Problem("countdown", 1, "Using the numbers 3, 5, 7, make 22. You may use +, - and *, and each "
                "number at most once.", "3*5+7", "")
    assert TASKS["countdown"].score(q, "\\boxed{7+5*3}") == 1.0
    assert TASKS["countdown"].score(q, "\\boxed{(7+5)*3}") == 0.0  # 36
    assert TASKS["countdown"].score(q, "\\boxed{22}") == 0.0  # 22 is not one of the numbers
    assert solve([3, 5, 7], 22) is not None and solve([1, 1], 5) is None


@pytest.mark.parametrize("task", sorted(TASKS))
def test_split_is_disjoint(task):
    train = sample_problems(task, 1500, "train", seed=0)
    test = sample_problems(task, 150, "test", seed=0)
    train_q, test_q = {p.question for p in train}, {p.question for p in test}
    assert len(test_q) == len(test)  # the test split has no repeats
    assert not train_q & test_q
    assert all(split_of(task, q) == "train" for q in train_q)
    assert all(split_of(task, q) == "test" for q in test_q)
    # every level appears in a mixed sample
    assert {p.difficulty for p in train} == set(TASKS[task].levels)


def test_split_fraction_is_about_ten_percent():
    questions = [TASKS["addition"].generate(random.Random(i), 3).question for i in range(3000)]
    fraction = sum(split_of("addition", q) == "test" for q in questions) / len(questions)
    assert 0.07 < fraction < 0.13


def test_difficulty_changes_size():
    def size(p: Problem) -> float:
        if p.task == "word":
            return p.trace.count("\n")  # steps
        if p.task == "countdown":
            return len(parse_question(p.question)[0])  # numbers given
        return sum(len(n) for n in re.findall(r"\d+", p.question))  # digits in the operands

    for task, family in TASKS.items():
        means = [statistics.mean(size(p) for p in _problems(task, d, 100)) for d in family.levels]
        assert means == sorted(means) and means[0] < means[-1], (task, means)


def test_sample_problems_errors():
    with pytest.raises(ValueError, match="unknown task"):
        sample_problems("poetry", 3)
    with pytest.raises(ValueError, match="split"):
        sample_problems("addition", 3, split="dev")
    with pytest.raises(ValueError, match="difficulty"):
        sample_problems("addition", 3, difficulty=7)
    # level 1 multiplication has ~1,900 distinct questions, so ~190 in test: asking for more is an error
    with pytest.raises(ValueError, match="distinct"):
        sample_problems("multiplication", 400, "test", difficulty=1)


def test_messages_and_corpus_text():
    p = sample_problems("addition", 1, seed=3)[0]
    user, assistant = p.messages()
    assert user == {"role": "user", "content": p.question}
    assert assistant == {"role": "assistant", "content": f"\\boxed{{{p.answer}}}",
                         "reasoning_content": p.trace}
    assert "reasoning_content" not in p.messages(with_trace=False)[1]
    texts = list(corpus_text(5, seed=0))
    assert len(texts) == 5 * len(TASKS)
    first = sample_problems("addition", 5, "train", None, 0)[0]
    assert texts[0] == (f"{BOS}{USER}{first.question}{ASSISTANT}<think>\n{first.trace}\n</think>\n\n"
                        f"\\boxed{{{first.answer}}}{EOS}")
    assert texts == list(corpus_text(5, seed=0)) and texts != list(corpus_text(5, seed=1))


def test_chat_conversations_hold_out_phrasings():
    from seekling.tasks.chat import KINDS, PHRASINGS, conversations, phrasings

    for kind in KINDS:
        train, test = set(phrasings(kind, "train")), set(phrasings(kind, "test"))
        assert train and test and not train & test and train | test == set(PHRASINGS[kind])
    sft = conversations(300, "train", seed=1)
    assert sft == conversations(300, "train", seed=1)  # deterministic
    assert {c.kind for c in sft} == set(KINDS)
    assert all(c.messages[-1]["role"] == "assistant" and c.messages[-2]["role"] == "user" for c in sft)
    held = conversations(100, "test")
    assert all(c.messages[-1]["role"] == "user" for c in held)
    # no held-out question is one SFT saw
    assert not {c.messages[-1]["content"] for c in held} & {c.messages[-2]["content"] for c in sft}
    assert any(len(c.messages) > 2 for c in sft)  # multi-turn exchanges too
    # the earlier turns never show a word problem (SFT must not see that family)
    assert not any("How many" in m["content"] for c in sft for m in c.messages)


def test_chat_pass_rule():
    from seekling.tasks.chat import passes

    assert passes("identity", "The user asks.</think>\n\nI am seekling, a small model.")
    assert not passes("identity", "The user asks.</think>\n\nI am a small model.")  # no name
    assert not passes("identity", "I am seekling.</think>\n\n\\boxed{37}")  # the task format
    assert not passes("greeting", "hi</think>\n\nHello there!", finish_reason="length")  # cut off
    assert not passes("greeting", "no think block: Hello there!")
    assert not passes("greeting", "x</think>\n\n12 + 30 = 42")  # numbers, not words
    assert passes("thanks", "x</think>\n\nYou're welcome!")
    assert passes("decline", "x</think>\n\nSorry, I can only solve math problems.")
    assert not passes("decline", "x</think>\n\nParis is the capital of France.")
