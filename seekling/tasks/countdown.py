"""Countdown: reach a target from given numbers with + - *, each number used at most once.
Any valid expression that reaches the target scores 1; it is checked by walking its `ast`, never eval."""

from __future__ import annotations

import ast
import random
from collections import Counter

from .base import Problem, TaskFamily, extract_answer

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
MAX_EXPRESSION_CHARS = 200


def evaluate(expression: str, numbers: list[int]) -> int | None:
    """The value of an expression made only of + - *, parentheses and the given numbers (each at most as
    often as given); None for anything else (other operators, names, calls, floats, reused numbers)."""
    expression = expression.replace("\u00d7", "*").replace("\u2212", "-").split("=")[0]
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None
    used: list[int] = []

    def walk(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            return None if left is None or right is None else _OPS[type(node.op)](left, right)
        return None

    value = walk(tree.body)
    return value if value is not None and not Counter(used) - Counter(numbers) else None


def solve(numbers: list[int], target: int) -> list[tuple[int, str, int, int]] | None:
    """The shortest derivation (fewest operations) found by iterative deepening over pairs of the pool:
    a list of steps (a, op, b, result), non-negative intermediates only, or None if unreachable."""

    dead_ends: set[tuple[tuple[int, ...], int]] = set()  # (sorted pool, depth) already searched in vain

    def search(pool: list[int], depth: int) -> list[tuple[int, str, int, int]] | None:
        if target in pool:
            return []
        key = (tuple(sorted(pool)), depth)
        if depth == 0 or key in dead_ends:
            return None
        for i in range(len(pool)):
            for j in range(len(pool)):
                if i == j:
                    continue
                a, b = pool[i], pool[j]
                rest = [pool[k] for k in range(len(pool)) if k not in (i, j)]
                for op, value in (("+", a + b), ("*", a * b), ("-", a - b)):
                    if (op != "-" and i > j) or (op == "-" and value <= 0):
                        continue  # + and * are symmetric; negatives and zero never help
                    found = search(rest + [value], depth - 1)
                    if found is not None:
                        return [(a, op, b, value)] + found
        dead_ends.add(key)
        return None

    for depth in range(1, len(numbers)):
        steps = search(list(numbers), depth)
        if steps is not None:
            return steps
    return None


def expression_of(numbers: list[int], steps: list[tuple[int, str, int, int]]) -> str:
    """Fold derivation steps into one expression, parenthesising every compound operand."""
    pool = [(n, str(n)) for n in numbers]
    for a, op, b, value in steps:
        ia = next(k for k, (v, _) in enumerate(pool) if v == a)
        ea = pool.pop(ia)[1]
        ib = next(k for k, (v, _) in enumerate(pool) if v == b)
        eb = pool.pop(ib)[1]
        wrap = lambda e: f"({e})" if not e.isdigit() else e
        pool.append((value, f"{wrap(ea)}{op}{wrap(eb)}"))
    return pool[-1][1]


class Countdown(TaskFamily):
    """Level 1: 3 numbers up to 10, target from two of them. Level 2: 4 numbers up to 12 (and maybe 25),
    target from 2-3. Level 3: 5 numbers up to 15 (and maybe 25 or 50), target from 3-4, up to 500."""

    name = "countdown"
    _shape = {1: (3, 10, (2, 2), 100), 2: (4, 12, (2, 3), 200), 3: (5, 15, (3, 4), 500)}

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        count, top, (klo, khi), cap = self._shape[difficulty]
        while True:
            numbers = [rng.randint(1, top) for _ in range(count)]
            if difficulty > 1 and rng.random() < 0.5:
                numbers[0] = rng.choice([25, 50] if difficulty == 3 else [25])
                rng.shuffle(numbers)
            # A random expression over a random subset sets the target, so a solution exists.
            pool = rng.sample(numbers, rng.randint(klo, khi))
            while len(pool) > 1:
                a, b = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
                pool.append(rng.choice([a + b, a * b, abs(a - b)]))
            target = pool[0]
            if 0 < target <= cap and target not in numbers:
                steps = solve(numbers, target)
                if steps is not None:  # only a zero intermediate could make it unreachable; redraw then
                    break
        lines = [f"{a}{op}{b}={v}" for a, op, b, v in steps]
        expression = expression_of(numbers, steps)
        question = (f"Using the numbers {', '.join(map(str, numbers))}, make {target}. "
                    f"You may use +, - and *, and each number at most once.")
        return Problem(self.name, difficulty, question, expression, "\n".join(lines))

    def score(self, problem: Problem, completion: str) -> float:
        """1.0 for any expression over the problem's numbers that equals the target."""
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        numbers, target = parse_question(problem.question)
        return 1.0 if evaluate(answer, numbers) == target else 0.0


def parse_question(question: str) -> tuple[list[int], int]:
    """The numbers and target of a countdown question (the question is the problem's whole state)."""
    head, _, rest = question.partition(", make ")
    numbers = [int(n) for n in head.removeprefix("Using the numbers ").split(", ")]
    return numbers, int(rest.split(".")[0])
