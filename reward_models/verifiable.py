"""Rewards a rule checks, for RL with verifiable rewards: the answer, the format, the length.

Each is a function scorer, f(prompts, completions, ...) -> one float per completion, usable from a config with no
Python written; the data's columns they name (`answer`) arrive by name, `args` bind the rest:

    reward:
      - {kind: function, path: 'reward_models.verifiable:accuracy'}          # data rows need an `answer` column
      - {kind: function, path: 'reward_models.verifiable:format', args: {pattern: '.*<answer>.+</answer>'}, weight: 0.2}
      - {kind: function, path: 'reward_models.verifiable:overlong', args: {max_tokens: 64, buffer: 16}}
"""

from __future__ import annotations

import re

TAGGED = re.compile(r"<answer>(.*?)</answer>|\\boxed\{([^{}]*)\}", re.S)
NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def final_answer(reply: str) -> str | None:
    """The answer a reply commits to: its last tagged one (<answer>...</answer> or \\boxed{...}), else its last
    number (GSM8K's convention: "3 + 4 = 7" answers 7, and a reply listing candidates is held to the last one);
    None when it has neither."""
    tagged = [first or second for first, second in TAGGED.findall(reply)]
    if tagged:
        return tagged[-1]
    numbers = NUMBER.findall(reply)
    return numbers[-1] if numbers else None


def normalize(answer) -> str:
    """A comparable form: a number as its value ("1,000", "1000.0" and "+1000" alike), else the text casefolded
    with its spaces collapsed and its outer punctuation and quotes stripped."""
    text = str(answer).strip()
    if NUMBER.fullmatch(text):
        value = float(text.replace(",", ""))
        return str(int(value)) if value.is_integer() else repr(value)
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'`")


def prompt_text(prompt) -> str:
    """A prompt's last user turn: the text a reply might echo (a string prompt is its own)."""
    if isinstance(prompt, str):
        return prompt
    users = [turn["content"] for turn in prompt if turn.get("role") == "user"]
    return users[-1] if users else ""


def accuracy(prompts: list, completions: list[str], answer: list) -> list[float]:
    """1.0 where the reply's final answer (`final_answer`) equals the row's `answer` once both are normalized,
    else 0.0. A reply that begins by repeating the prompt is judged on what follows: echoing a question whose
    last number happens to be the answer earns nothing."""
    scores = []
    for prompt, completion, truth in zip(prompts, completions, answer, strict=True):
        reply, asked = completion.strip(), prompt_text(prompt).strip()
        if asked and reply.startswith(asked):
            reply = reply[len(asked):]
        given = final_answer(reply)
        scores.append(float(given is not None and normalize(given) == normalize(truth)))
    return scores


def format(prompts: list, completions: list[str], pattern: str) -> list[float]:  # noqa: A001 (TRL's name)
    """1.0 where the whole reply (outer whitespace stripped) matches the regular expression `pattern` (`.`
    matching newlines too), else 0.0."""
    compiled = re.compile(pattern, re.S)
    return [float(compiled.fullmatch(completion.strip()) is not None) for completion in completions]


def overlong(prompts: list, completions: list[str], completion_ids: list[list[int]], max_tokens: int,
             buffer: int) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), by each reply's tokens L: 0 up to
    max_tokens - buffer, then falling linearly to -1 at max_tokens, and -1 past it."""
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"overlong needs 0 < buffer <= max_tokens, got buffer={buffer}, max_tokens={max_tokens}")
    scores = []
    for ids in completion_ids:
        free = max_tokens - buffer
        scores.append(0.0 if len(ids) <= free else -1.0 if len(ids) > max_tokens else (free - len(ids)) / buffer)
    return scores
