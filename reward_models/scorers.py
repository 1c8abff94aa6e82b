"""Scorers: what PPO and eval call to turn (prompt, completion) pairs into one float each.

A scorer is a learned reward model (any sequence classifier with one output, e.g. `rlft reward`'s output
dir), a Python function `f(prompts, completions)`, or a weighted sum of several. Prompts arrive raw (a
string or a list of {"role", "content"} messages, never the policy's chat template); each model scorer
formats them with `encode`, the same function `rlft reward` trains through, so scoring sees exactly the
tokens training saw. Every result is checked (shape, finite) and a bad one names its scorer.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from rlft.config import ModelConfig, option, require
from rlft.errors import RlftError

NORMALIZATION = "normalization.json"  # {"mean", "std"} of the trained model's scores; see reward_models.train


@dataclass
class ScorerConfig:
    name: str = option("", "Label in logs and reports; empty: derived from path.")
    kind: Literal["model", "function"] = option(
        "model", "model: a sequence classifier with one output; function: a Python f(prompts, completions)."
    )
    path: str = option(
        "", "model: a directory (e.g. runs/reward), an embedded name or a hub id; function: "
        "'module:function' or 'path/to/file.py:function'."
    )
    weight: float = option(1.0, "Weight of this scorer in the weighted sum of several.")
    batch_size: int = option(32, "model: rows per forward pass.")
    max_length: int = option(512, "model: truncate (prompt, completion) to at most this many tokens (never more "
                             "than the reward model was trained with).")
    normalize: bool = option(
        False, "model: apply its normalization.json, so the SFT policy's completions score mean 0, std 1."
    )

    def __post_init__(self):
        require(bool(self.path), "path", "must name a reward model dir, 'module:function' or 'file.py:function'")
        if self.kind == "function":
            require(":" in self.path, "path", f"'{self.path}' must be 'module:function' or 'path/to/file.py:function'")
        else:
            require(":" not in self.path or Path(self.path).exists(), "kind",
                    f"path '{self.path}' looks like module:function; set kind: function")
        require(self.batch_size > 0, "batch_size", "must be >= 1")
        require(self.max_length > 0, "max_length", "must be >= 1")
        require(not (self.normalize and self.kind == "function"), "normalize", "only applies to kind: model")
        if not self.name:
            self.name = self.path.rsplit(":", 1)[-1] if self.kind == "function" else Path(self.path).name


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        """(batch,) float32 scores on the CPU."""


def build_scorer(configs: list[ScorerConfig], device=None) -> Scorer:
    """One config: that scorer. Several: their weighted sum. A lone scorer's weight still applies."""
    if not configs:
        raise RlftError("no scorer configured: name a reward model dir or a module:function")
    names = [c.name for c in configs]
    if len(set(names)) < len(names):
        raise RlftError(f"scorer names {names} repeat: give each scorer a distinct name")
    parts = [(ModelScorer(c, device) if c.kind == "model" else FunctionScorer(c), c.weight) for c in configs]
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return WeightedSum(parts)


def checked(name: str, scores, count: int) -> torch.Tensor:
    """Scores as a (count,) float32 CPU tensor, or an RlftError that names the scorer."""
    try:
        scores = torch.as_tensor(scores).detach().to("cpu", torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise RlftError(f"scorer '{name}' returned {type(scores).__name__}, not numbers: {e}") from None
    if tuple(scores.shape) != (count,):
        raise RlftError(f"scorer '{name}' returned shape {tuple(scores.shape)} for {count} completions: "
                        f"it must return one float per completion")
    if not torch.isfinite(scores).all():
        raise RlftError(f"scorer '{name}' returned {int((~torch.isfinite(scores)).sum())} NaN/inf scores "
                        f"of {count}: fix the scorer or its inputs")
    return scores


# ---------------------------------------------------------------------------------------------------
# Learned reward models


def encode(tokenizer, prompt, completion: str, max_length: int) -> list[int]:
    """Token ids of one (prompt, completion): the single format reward models train and score on.

    With a chat template and a message-list prompt: the conversation plus the reply as an assistant turn,
    keeping the last `max_length` tokens (causal reward heads read the last token). Otherwise (BERT has no
    template): the prompt as a "role: content" transcript and the completion as the two segments of a
    pair, truncating the longer first. token_type_ids are not used: TRL's collator passes only input_ids
    and attention_mask, so scoring leaves them at 0 as training did.
    """
    if tokenizer.chat_template and isinstance(prompt, list):
        messages = prompt + [{"role": "assistant", "content": completion}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        return list(ids[-max_length:])
    text = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    if not text:
        return tokenizer(completion, truncation=True, max_length=max_length)["input_ids"]
    return tokenizer(text, completion, truncation="longest_first", max_length=max_length)["input_ids"]


def length_limit(model, tokenizer, max_length: int) -> int:
    """max_length, capped at the model's position embeddings (BERT's 512) and the tokenizer's
    model_max_length, which `rlft reward` sets to its train.max_length: a scorer truncates as training did."""
    from rlft.models import context_length

    return min(max_length, context_length(model) or max_length, tokenizer.model_max_length or max_length)


@torch.no_grad()
def score_ids(model, ids: list[list[int]], pad_token_id: int, batch_size: int) -> torch.Tensor:
    """(len(ids),) float32 CPU scores: right-padded batches, as TRL's preference collator pads them.

    Rows are batched in length order (padding is most of the compute for short replies on a CPU); the
    attention mask makes each score independent of its batch-mates, so the order does not change them.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    scores = torch.zeros(len(ids))
    for start in range(0, len(ids), batch_size):
        rows = order[start : start + batch_size]
        batch = [torch.tensor(ids[i], dtype=torch.long) for i in rows]
        input_ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, tokens in enumerate(batch):
            attention_mask[row, : len(tokens)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        scores[rows] = logits[:, 0].float().cpu()
    model.train(was_training)
    return scores


class ModelScorer:
    def __init__(self, config: ScorerConfig, device=None):
        from transformers import AutoModelForSequenceClassification

        from rlft.models import load_model, load_tokenizer, resolve

        self.name, self.batch_size = config.name, config.batch_size
        model_config = ModelConfig(name_or_path=config.path)
        self.tokenizer = load_tokenizer(model_config)
        self.model = load_model(model_config, loader=AutoModelForSequenceClassification, device=device).eval()
        if self.model.config.num_labels != 1:
            raise RlftError(f"scorer '{self.name}': '{config.path}' has {self.model.config.num_labels} outputs; "
                            "a reward model needs exactly 1 (train one with rlft reward)")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # causal heads find the last real token by it
        self.max_length = length_limit(self.model, self.tokenizer, config.max_length)
        self.mean, self.std = 0.0, 1.0
        if config.normalize:
            stats_file = Path(resolve(config.path)) / NORMALIZATION
            if not stats_file.is_file():
                raise RlftError(f"scorer '{self.name}': normalize is on but '{stats_file}' is missing: "
                                "train the model with rlft reward, or set normalize: false")
            from rlft.runs import read_json

            stats = read_json(stats_file)
            self.mean, self.std = float(stats["mean"]), float(stats["std"])

    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        ids = [encode(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions, strict=True)]
        scores = score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)
        return checked(self.name, (scores - self.mean) / self.std, len(completions))


# ---------------------------------------------------------------------------------------------------
# Functions and sums


def import_function(path: str):
    """'package.module:function' or 'path/to/file.py:function' -> the function."""
    location, _, attribute = path.rpartition(":")
    try:
        if location.endswith(".py"):
            if not Path(location).is_file():
                raise FileNotFoundError(f"no file '{location}'")
            spec = importlib.util.spec_from_file_location(Path(location).stem, location)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(location)
        function = getattr(module, attribute)
    except Exception as e:  # whatever the module raises while importing is the user's to fix
        raise RlftError(f"scorer '{path}' does not import: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not callable(function):
        raise RlftError(f"scorer '{path}' is a {type(function).__name__}, not a function")
    return function


class FunctionScorer:
    def __init__(self, config: ScorerConfig):
        self.name, self.function = config.name, import_function(config.path)

    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        try:
            scores = self.function(list(prompts), list(completions))
        except RlftError:
            raise
        except Exception as e:  # the user's function: its failure is theirs to fix, said in one line
            raise RlftError(f"scorer '{self.name}' raised {type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0][:200]}") from None
        return checked(self.name, scores, len(completions))


class WeightedSum:
    """sum_i weight_i * scorer_i(prompts, completions); `parts` lets a report show each term."""

    def __init__(self, parts: list[tuple[Scorer, float]]):
        self.parts = parts
        self.name = " + ".join(f"{weight:g}*{scorer.name}" for scorer, weight in parts)

    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        return sum(weight * scorer(prompts, completions) for scorer, weight in self.parts)
