"""The embedded tasks: seeded arithmetic problems with gold answers, split into train and held-out rows.

Rows are plain dicts in the data layer's format: `prompt`, `answer` (gold, as text), `source` ("math"), `id`.
The held-out split is a fixed, seeded sample of operand pairs that never appears in training. Additions
(data.source=arithmetic, the default run) and products (data.source=products, the tool-use demo: a tiny model
cannot multiply 2-digit numbers in its head, but it can call a calculator).
"""

from __future__ import annotations

import random


OPERATIONS = {"+": ("add", lambda a, b: a + b), "*": ("mul", lambda a, b: a * b)}


def arithmetic_rows(digits: int, eval_size: int, seed: int, second_digits: int | None = None, op: str = "+"
                    ) -> tuple[list[dict], list[dict]]:
    """All problems a `op` b (op: + or *) of a `digits`-digit a and a `second_digits`-digit b (None: `digits` too),
    shuffled with `seed`; the first `eval_size` are held out."""
    second_digits = second_digits or digits
    lo, hi = 10 ** (digits - 1), 10**digits
    pairs = [(a, b) for a in range(lo, hi) for b in range(10 ** (second_digits - 1), 10**second_digits)]
    if eval_size >= len(pairs):
        raise ValueError(f"data.eval_size ({eval_size}) must be smaller than the {len(pairs)} problems of "
                         f"{digits} + {second_digits} digits")
    random.Random(seed).shuffle(pairs)
    name, value = OPERATIONS[op]
    rows = [
        {"id": f"{name}-{a}-{b}", "prompt": f"What is {a}{op}{b}?", "answer": str(value(a, b)), "source": "math"}
        for a, b in pairs
    ]
    return rows[eval_size:], rows[:eval_size]
