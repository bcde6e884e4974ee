"""Column arithmetic: addition/subtraction digit by digit with carries and borrows, and long
multiplication by partial products. Numbers are natural (unpadded), so the model must align columns."""

from __future__ import annotations

import random

from .base import Problem, TaskFamily


def _number(rng: random.Random, n_digits: int) -> int:
    return rng.randint(0 if n_digits == 1 else 10 ** (n_digits - 1), 10**n_digits - 1)


def _digits(n: int) -> list[int]:
    """Digits from the lowest."""
    return [int(c) for c in reversed(str(n))]


def add_lines(a: int, b: int) -> list[str]:
    """One line per column from the ones: '7+6+1=14, write 4, carry 1'."""
    da, db = _digits(a), _digits(b)
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        lines.append(f"{x}+{y}{'+1' if carry else ''}={s}, write {s % 10}{', carry 1' if s >= 10 else ''}")
        carry = s // 10
    if carry:
        lines.append("write 1")
    return lines


def sub_lines(a: int, b: int) -> list[str]:
    """a - b for a >= b, one line per column from the ones: '3-5-1=-3, +10=7, write 7, borrow 1'."""
    da, db = _digits(a), _digits(b)
    lines, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        t = x - y - borrow
        head = f"{x}-{y}{'-1' if borrow else ''}={t}"
        lines.append(f"{head}, +10={t + 10}, write {t + 10}, borrow 1" if t < 0 else f"{head}, write {t}")
        borrow = int(t < 0)
    return lines


class Addition(TaskFamily):
    """Level 1: 1-2 digit sums. Level 2: 2-3 digits, + or -. Level 3: 3-5 digits, + or -."""

    name = "addition"
    _digit_range = {1: (1, 2), 2: (2, 3), 3: (3, 5)}

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        lo, hi = self._digit_range[difficulty]
        a, b = _number(rng, rng.randint(lo, hi)), _number(rng, rng.randint(lo, hi))
        op = "+" if difficulty == 1 else rng.choice("+-")
        if op == "+":
            lines, result = add_lines(a, b), a + b
        elif a >= b:
            lines, result = sub_lines(a, b), a - b
        else:  # a negative result: subtract the other way round and negate
            lines, result = [f"{a} < {b}, so compute {b} - {a} and negate"] + sub_lines(b, a), a - b
        lines.append(f"{a} {op} {b} = {result}")
        return Problem(self.name, difficulty, f"What is {a} {op} {b}?", str(result), "\n".join(lines))


class Multiplication(TaskFamily):
    """Level 1: (1-2 digits) x (1 digit), either order. Level 2: (2-3) x (1-2). Level 3: (3-4) x (2-3)."""

    name = "multiplication"
    _digit_range = {1: ((1, 2), (1, 1)), 2: ((2, 3), (1, 2)), 3: ((3, 4), (2, 3))}

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        (alo, ahi), (blo, bhi) = self._digit_range[difficulty]
        a, b = _number(rng, rng.randint(alo, ahi)), _number(rng, rng.randint(blo, bhi))
        if difficulty == 1 and rng.random() < 0.5:
            a, b = b, a  # both orders, which also doubles the few distinct level-1 questions
        # One partial product per non-zero digit of b (from the ones), then a running sum.
        lines, total = [], None
        for i, d in enumerate(_digits(b)):
            if d == 0:
                continue
            part = a * d * 10**i
            lines.append(f"{a}*{d * 10**i}={part}")
            if total is not None:
                lines.append(f"{total}+{part}={total + part}")
            total = part if total is None else total + part
        lines.append(f"{a} * {b} = {a * b}")
        return Problem(self.name, difficulty, f"What is {a} * {b}?", str(a * b), "\n".join(lines))
