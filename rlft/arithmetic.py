"""The built-in `arithmetic` data: problems with known answers, made here, offline, the same on every machine.

Each row is a prompt (one user turn) and its `answer`, the column reward_models.verifiable:accuracy checks:

    {"prompt": [{"role": "user", "content": "What is 47 + 38? Give the number only."}], "answer": "85"}

Sums and differences of two-digit numbers and products of a one-digit and a two-digit number, a third each,
drawn from a fixed seed: rlft's train / held-out split of whole prompts applies as to any data.
"""

from __future__ import annotations

import random

PROBLEMS = 4000  # distinct prompts: a 20% hold-out keeps 800 for evaluation
SEED = 20261206
INSTRUCTION = "Give the number only."


def problem(rng: random.Random) -> tuple[str, int]:
    """One question and its answer."""
    kind = rng.choice("+-*")
    if kind == "*":
        a, b = rng.randint(2, 9), rng.randint(11, 99)
        return f"What is {a} times {b}?", a * b
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if kind == "-":
        a, b = max(a, b), min(a, b)  # no negative answers
        return f"What is {a} minus {b}?", a - b
    return f"What is {a} plus {b}?", a + b


def arithmetic_rows(count: int = PROBLEMS, seed: int = SEED) -> list[dict]:
    """`count` distinct problems as prompt rows with their `answer`."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < count:
        question, answer = problem(rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}], "answer": str(answer)})
    return rows
