"""The built-in `arithmetic` data: problems with known answers, made here, offline, the same on every machine.

Each row is a prompt (one user turn) and its `answer`, the column reward_models.verifiable:accuracy checks:

    {"prompt": [{"role": "user", "content": "What is 17 plus 28? Give the number only."}], "answer": "45"}

Sums and differences of numbers up to 30 and products of one-digit numbers, drawn from a fixed seed: rlft's
train / held-out split of whole prompts applies as to any data. Two-digit sums were too hard for the embedded
SmolLM2-135M (examples/verifiable/start_accuracy.py): nearly no reward to learn from.
"""

from __future__ import annotations

import random

PROBLEMS = 1400  # distinct prompts (of 1,429 there are): a 20% hold-out keeps 280 for evaluation
SEED = 20261206
INSTRUCTION = "Give the number only."


def problem(rng: random.Random) -> tuple[str, int]:
    """One question and its answer."""
    kind = rng.choice("+-*")
    if kind == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"What is {a} times {b}?", a * b
    a, b = rng.randint(1, 30), rng.randint(1, 30)
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
