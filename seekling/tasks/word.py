"""Templated multi-step word problems in plain English; the trace does one step per line."""

from __future__ import annotations

import random

from .base import Problem, TaskFamily

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Iris", "Jack", "Kim", "Leo", "Mia",
         "Noah"]
ITEMS = ["apples", "marbles", "stickers", "cards", "pencils", "shells", "coins", "books", "eggs", "stamps"]


class WordProblems(TaskFamily):
    """Level 1: one step, numbers up to 20. Level 2: two steps, up to 50. Level 3: three or four steps,
    up to 100, including equal sharing (exact division)."""

    name = "word"
    _limits = {1: (1, 1, 20), 2: (2, 2, 50), 3: (3, 4, 100)}  # min steps, max steps, largest number

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        lo, hi, top = self._limits[difficulty]
        name, friend = rng.sample(NAMES, 2)
        item = rng.choice(ITEMS)
        x = rng.randint(2, top)
        sentences, lines = [f"{name} has {x} {item}."], [f"start: {x}"]
        kinds = ["buy", "get", "give", "lose"] + (["share"] if difficulty == 3 else [])
        for _ in range(rng.randint(lo, hi)):
            kind = rng.choice(kinds)
            divisors = [n for n in range(2, 10) if x % n == 0 and x // n > 1]
            if (kind in ("give", "lose") and x < 2) or (kind == "share" and not divisors):
                kind = "get"  # keep every intermediate count positive and every division exact
            if kind == "buy":
                k, m = rng.randint(2, 2 + difficulty), rng.randint(2, max(3, top // 5))
                sentences.append(f"{name} buys {k} bags with {m} {item} in each.")
                lines.append(f"buys {k} bags of {m}: {k}*{m}={k * m}, {x}+{k * m}={x + k * m}")
                x += k * m
            elif kind == "get":
                g = rng.randint(1, top)
                sentences.append(f"{friend} gives {name} {g} more {item}.")
                lines.append(f"gets {g}: {x}+{g}={x + g}")
                x += g
            elif kind == "give":
                g = rng.randint(1, x - 1)
                sentences.append(f"{name} gives {g} {item} to {friend}.")
                lines.append(f"gives {g}: {x}-{g}={x - g}")
                x -= g
            elif kind == "lose":
                g = rng.randint(1, x - 1)
                sentences.append(f"{name} loses {g} {item}.")
                lines.append(f"loses {g}: {x}-{g}={x - g}")
                x -= g
            else:
                n = rng.choice(divisors)
                sentences.append(f"{name} shares the {item} equally among {n} friends, {name} included.")
                lines.append(f"shares among {n}: {x}/{n}={x // n}")
                x //= n
        sentences.append(f"How many {item} does {name} have now?")
        return Problem(self.name, difficulty, " ".join(sentences), str(x), "\n".join(lines))
