"""Scorers: what PPO and eval call to turn (prompt, completion) pairs into one float each.

A scorer is a learned reward model (any sequence classifier with one output, e.g. `rlft reward`'s output
dir), a Python function `f(prompts, completions)`, or a weighted sum of several. Prompts arrive raw (a
string or a list of {"role", "content"} messages, never the policy's chat template); each model scorer
formats them with `encode`, the same function `rlft reward` trains through, so scoring sees exactly the
tokens training saw. Every result is checked (shape, finite) and a bad one names its scorer.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import math
import re
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from rlft.config import ModelConfig, option, require
from rlft.errors import RlftError
from rlft.models import auto_config, context_length, load_model, load_tokenizer, resolve
from rlft.policy import active_adapter, adapter_info, load_reference
from rlft.runs import read_json, reading

NORMALIZATION = "normalization.json"  # {"mean", "std"} of the trained model's scores; see reward_models.train


@dataclass
class ScorerConfig:
    name: str = option("", "Label in logs and reports; empty: derived from path.")
    kind: Literal["model", "function", "adapter"] = option(
        "model", "model: a sequence classifier with one output (a folder, hub id, or `rlft reward` LoRA adapter "
        "on its own base); function: a Python f(prompts, completions); adapter: an `rlft reward` LoRA adapter "
        "scored on PPO's own base weights, no second copy (elsewhere: as model)."
    )
    path: str = option(
        "", "model: a directory (e.g. runs/reward), an embedded name or a hub id; function: "
        "'module:function' or 'path/to/file.py:function'. Built in: reward_models.verifiable:accuracy (1 if the "
        "reply's final number or tagged answer equals the data's `answer` column), :format (the reply matches "
        "args.pattern), :overlong (DAPO's soft penalty past args.max_tokens - args.buffer); "
        "reward_models.judges:sentiment (VADER)."
    )
    weight: float = option(1.0, "Weight of this scorer in the weighted sum of several.")
    args: dict[str, Any] = option({}, "function: keyword arguments bound to it, e.g. {max_tokens: 64} for "
                                  "reward_models.verifiable:overlong (the data's columns arrive by name besides).")
    batch_size: int = option(32, "model: rows per forward pass.")
    max_length: int = option(512, "model: truncate (prompt, completion) to at most this many tokens (never more "
                             "than the reward model was trained with).")
    normalize: bool = option(
        False, "model: apply its normalization.json, so the SFT policy's completions score mean 0, std 1."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "model: weights dtype, as model.dtype (a LoRA reward model takes its base's, as trained).")
    timeout: float = option(
        300.0, "function: seconds one call may take before the run stops with one line (0: none). A hung scorer (a "
        "request that never returns) then ends the run in minutes, not never; the shipped judges take well under a "
        "second. PPO calls it once per rollout batch, preferences and eval once over all their completions: raise it "
        "for a slow judge (an LLM behind an API). Enforced in the main thread only.")

    def __post_init__(self):
        require(bool(self.path), "path", "must name a reward model dir, 'module:function' or 'file.py:function'")
        if self.kind == "function":
            require(":" in self.path, "path", f"'{self.path}' must be 'module:function' or 'path/to/file.py:function'")
        else:
            require(":" not in self.path or Path(self.path).exists(), "kind",
                    f"path '{self.path}' looks like module:function; set kind: function")
        require(self.batch_size > 0, "batch_size", "must be >= 1")
        require(self.max_length > 0, "max_length", "must be >= 1")
        require(math.isfinite(self.weight), "weight", "must be a finite number")
        require(self.timeout >= 0, "timeout", "must be >= 0 seconds (0: none)")
        require(not (self.normalize and self.kind == "function"), "normalize", "only applies to learned models")
        require(not self.args or self.kind == "function", "args", "only applies to kind: function")
        if not self.name:
            self.name = self.path.rsplit(":", 1)[-1] if self.kind == "function" else Path(self.path).name


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: list, completions: list[str], **columns: list) -> torch.Tensor:
        """(batch,) float32 scores on the CPU. columns: the data's other columns, one value per completion (a
        function scorer receives those it names; a model ignores them)."""


def build_scorer(configs: list[ScorerConfig], device=None, shared_base: bool = False) -> Scorer:
    """One config: that scorer. Several: their weighted sum. A lone scorer's weight still applies.

    shared_base: `kind: adapter` scorers wait to be attached to the caller's base (PPO); else they load
    standalone on their own base, like `kind: model` (eval, preferences)."""
    check_scorers(configs)
    kinds = {"model": lambda c: ModelScorer(c, device), "function": FunctionScorer,
             "adapter": AdapterScorer if shared_base else lambda c: ModelScorer(c, device)}
    parts = [(kinds[c.kind](c), c.weight) for c in configs]
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return WeightedSum(parts)


def check_scorers(configs: list[ScorerConfig]) -> None:
    """Refuse no scorer at all, or two of one name (their logs and reports would mix)."""
    if not configs:
        raise RlftError("no scorer configured: name a reward model dir or a module:function")
    names = [c.name for c in configs]
    if len(set(names)) < len(names):
        raise RlftError(f"scorer names {names} repeat: give each scorer a distinct name")


def check_scorer(config: ScorerConfig, shared_base: bool = False) -> ModelConfig | None:
    """Every check a scorer makes before its weights load, loading none (`rlft plan`): a function imports; a model
    folder holds weights; an adapter folder records its base; normalization.json is there when asked for.
    Returns the base model of a learned scorer (an adapter's own base, which `shared_base` PPO shares), None for
    a function."""
    if config.kind == "function":
        import_function(config.path)
        return None
    if config.kind == "adapter" and shared_base:
        require_adapter(config)
        base = adapter_info(config.path)[0]
    else:
        folder = Path(resolve(config.path))
        require_weights(config, folder)
        base = adapter_info(config.path)[0] if (folder / "adapter_config.json").is_file() else \
            ModelConfig(name_or_path=config.path, dtype=config.dtype)
    try:
        auto_config(base)  # the model's config file is there (or on the hub): its weights will be too
    except RlftError as e:
        if Path(config.path).exists():
            raise RlftError(f"scorer '{config.name}': {e}") from None
        raise RlftError(f"scorer '{config.name}': '{config.path}' not found: not a folder here, not an embedded model, "
                        "not on the hub (or the hub is unreachable): train it with rlft reward first, or fix its path"
                        ) from None
    normalization(config)
    return base


def require_weights(config: ScorerConfig, folder: Path) -> None:
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise RlftError(f"scorer '{config.name}': '{config.path}' holds no model weights (an empty folder, or a run "
                        "of rlft reward that did not finish): finish or rerun rlft reward there, or fix the path")


def require_adapter(config: ScorerConfig) -> None:
    if not (Path(config.path) / "adapter_config.json").is_file():
        raise RlftError(f"scorer '{config.name}': '{config.path}' has no adapter_config.json: kind: adapter needs "
                        "an rlft reward run with lora_enabled: true (use kind: model for a full classifier)")


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
    # A bf16/fp16 trunk scores under autocast, as the HF Trainer trained and measured it (accelerate wraps its
    # forward so): the float32 score head reads the half-precision hidden states, and every path scores alike.
    dtype = model.get_input_embeddings().weight.dtype
    half = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    scores = torch.zeros(len(ids))
    for start in range(0, len(ids), batch_size):
        rows = order[start : start + batch_size]
        batch = [torch.tensor(ids[i], dtype=torch.long) for i in rows]
        input_ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, tokens in enumerate(batch):
            attention_mask[row, : len(tokens)] = 1
        with half:
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        scores[rows] = logits[:, 0].float().cpu()
    model.train(was_training)
    return scores


class ModelScorer:
    def __init__(self, config: ScorerConfig, device=None):
        from transformers import AutoModelForSequenceClassification

        self.name, self.batch_size = config.name, config.batch_size
        model_config = ModelConfig(name_or_path=config.path, dtype=config.dtype)
        folder = Path(resolve(config.path))
        require_weights(config, folder)
        with reading(config.path, "rerun rlft reward to train it again"):
            self.tokenizer = load_tokenizer(model_config)
            if (folder / "adapter_config.json").is_file():  # a LoRA reward model: base + adapter
                from peft import PeftModel

                base_config, reference_adapter = adapter_info(config.path)
                base = load_reference(base_config, reference_adapter, device,
                                      loader=AutoModelForSequenceClassification, num_labels=1)
                self.model = PeftModel.from_pretrained(base, resolve(config.path)).eval()
            else:
                self.model = load_model(model_config, loader=AutoModelForSequenceClassification, device=device).eval()
        if self.model.config.num_labels != 1:
            raise RlftError(f"scorer '{self.name}': '{config.path}' has {self.model.config.num_labels} outputs; "
                            "a reward model needs exactly 1 (train one with rlft reward)")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # causal heads find the last real token by it
        self.max_length = length_limit(self.model, self.tokenizer, config.max_length)
        self.mean, self.std = normalization(config)

    def __call__(self, prompts: list, completions: list[str], **columns: list) -> torch.Tensor:
        ids = [encode(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions, strict=True)]
        scores = score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)
        return checked(self.name, (scores - self.mean) / self.std, len(completions))


def normalization(config: ScorerConfig) -> tuple[float, float]:
    """(mean, std) to standardise a learned scorer's output: its normalization.json, or (0, 1)."""
    if not config.normalize:
        return 0.0, 1.0
    stats_file = Path(resolve(config.path)) / NORMALIZATION
    if not stats_file.is_file():
        raise RlftError(f"scorer '{config.name}': normalize is on but '{stats_file}' is missing: "
                        "train the model with rlft reward, or set normalize: false")
    stats = read_json(stats_file, "rerun rlft reward to write it again, or set normalize: false")
    mean, std = stats.get("mean"), stats.get("std")
    if not (isinstance(mean, (int, float)) and isinstance(std, (int, float)) and math.isfinite(mean)
            and math.isfinite(std) and std > 0):
        # a negative std would flip the reward's sign, a zero one divide by it
        raise RlftError(f"'{stats_file}' is damaged (mean {mean!r}, std {std!r}: it needs a finite mean and a "
                        "positive std): rerun rlft reward to write it again, or set normalize: false")
    return float(mean), float(std)


class AdapterScorer:
    """A LoRA reward model scored on the weights PPO already holds: its adapter is loaded next to the
    policy's and switched on for scoring only, and its score head reads the shared trunk. One copy of the
    base serves policy, reference, reward model and critic.

    Built before the policy (its files are checked first); `attach` then loads it onto the policy.
    """
    def __init__(self, config: ScorerConfig):
        self.name, self.batch_size, self.path = config.name, config.batch_size, config.path
        # one adapter per scorer (a weighted sum may hold several); peft's module keys may not contain dots
        self.adapter = "reward_" + re.sub(r"\W", "_", config.name)
        require_adapter(config)
        self.base_config, self.reference_adapter = adapter_info(config.path)
        self.tokenizer = load_tokenizer(ModelConfig(name_or_path=config.path))
        self.max_length = min(config.max_length, self.tokenizer.model_max_length or config.max_length)
        self.mean, self.std = normalization(config)
        self.policy = self.model = None

    def check_base(self, model_config: ModelConfig, reference_adapter: str | None) -> None:
        """Refuse a reward adapter trained on other weights than the policy's base (+ merged SFT adapter)."""
        def weights(config, adapter):
            return (config.name_or_path, config.revision, config.quantization,
                    str(Path(adapter).resolve()) if adapter else None)

        mine, theirs = weights(self.base_config, self.reference_adapter), weights(model_config, reference_adapter)
        if mine != theirs:
            raise RlftError(
                f"scorer '{self.name}': reward adapter '{self.path}' was trained on {describe(*mine)}, but PPO runs on "
                f"{describe(*theirs)}: train the reward model on PPO's base (rlft reward sft_adapter=...), or use "
                "kind: model to load it on its own base")

    def attach(self, policy) -> None:
        """Load the reward adapter (frozen) into the peft `policy` and build the classifier over its trunk."""
        from safetensors.torch import load_file

        with reading(self.path, "rerun rlft reward to train it again"):
            policy.load_adapter(self.path, adapter_name=self.adapter, is_trainable=False)
            saved = load_file(Path(self.path) / "adapter_model.safetensors")
        policy.train(policy.training)  # the new adapter's dropout modules start in training mode
        self.model = classifier_on(policy.get_base_model(), saved, self.tokenizer.pad_token_id, self.name)
        self.policy = policy

    def value_head_init(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (1, H), bias (1,)) of a value head that outputs this scorer's normalised score."""
        head = next(module for name, module in self.model.named_children() if name != self.model.base_model_prefix)
        if not isinstance(head, torch.nn.Linear):
            raise RlftError(f"scorer '{self.name}': its score head is a {type(head).__name__}, not one linear layer: "
                            "an adapter critic cannot start from it; set ppo.critic=head")
        bias = head.bias if head.bias is not None else torch.zeros(1, device=head.weight.device)
        return head.weight.detach() / self.std, (bias.detach() - self.mean) / self.std

    def __call__(self, prompts: list, completions: list[str], **columns: list) -> torch.Tensor:
        assert self.policy is not None, "AdapterScorer.attach(policy) first"
        ids = [encode(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions, strict=True)]
        with active_adapter(self.policy, self.adapter):
            scores = score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)
        return checked(self.name, (scores - self.mean) / self.std, len(completions))


def describe(name, revision, quantization, adapter) -> str:
    return (f"'{name}'" + (f"@{revision}" if revision else "") + (f" ({quantization})" if quantization != "none" else "")
            + (f" + SFT adapter '{adapter}'" if adapter else " with no SFT adapter"))


def classifier_on(causal_lm, adapter_weights: dict, pad_token_id: int, name: str):
    """A *ForSequenceClassification model whose trunk IS `causal_lm`'s (the same modules, no copy) and whose
    score head comes from a peft SEQ_CLS adapter's weights: HF's own forward then pools the last real token,
    exactly as the standalone reward model does."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels, config.pad_token_id = 1, pad_token_id
    with torch.device("meta"):  # the shell's own trunk is never materialised
        shell = AutoModelForSequenceClassification.from_config(config)
    prefix = shell.base_model_prefix
    setattr(shell, prefix, getattr(causal_lm, prefix))
    head_keys = [key for key in shell.state_dict() if not key.startswith(prefix + ".")]
    missing = [key for key in head_keys if f"base_model.model.{key}" not in adapter_weights]
    if missing:
        raise RlftError(f"scorer '{name}': the reward adapter has no score head ({missing[0]}): retrain it with "
                        "rlft reward lora_enabled=true")
    device = next(causal_lm.parameters()).device
    head = {key: adapter_weights[f"base_model.model.{key}"].to(device) for key in head_keys}
    shell.load_state_dict(head, strict=False, assign=True)
    return shell.eval()


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
    """f(prompts, completions, **columns): the data's columns it names (or all of them, to a **kwargs) arrive as
    keyword arguments, one value per completion."""

    def __init__(self, config: ScorerConfig):
        self.name, self.timeout = config.name, config.timeout
        function = import_function(config.path)
        try:  # args that name no argument of the function: said now, not as a TypeError mid-run
            inspect.signature(function).bind_partial(None, None, **config.args)
        except TypeError as e:
            raise RlftError(f"scorer '{self.name}': args {sorted(config.args)} do not fit {config.path} ({e}): "
                            "name the function's own arguments") from None
        except ValueError:  # no signature to check against
            pass
        self.function = functools.partial(function, **config.args)
        try:
            parameters = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: prompts and completions only
            parameters = []
        # After the two positional ones (prompts, completions), the names a column may fill; what args bound
        # stays bound (a column of that name never replaces it)
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        named = [p for p in positional[2:] + [p for p in parameters if p.kind is p.KEYWORD_ONLY]
                 if p.name not in config.args]
        self.takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters)
        self.takes = {p.name for p in named}
        self.needs = {p.name for p in named if p.default is p.empty}
        self.bound = set(config.args)

    def __call__(self, prompts: list, completions: list[str], **columns: list) -> torch.Tensor:
        given = ({name: values for name, values in columns.items() if name not in self.bound} if self.takes_all
                 else {name: columns[name] for name in self.takes & columns.keys()})
        try:
            with time_limit(self.timeout, f"scorer '{self.name}' took longer than its timeout of {self.timeout:g} s on "
                                          f"{len(completions)} completions: fix it, or raise its `timeout` (0: none)"):
                scores = self.function(list(prompts), list(completions), **given)
        except RlftError:
            raise
        except (Exception, SystemExit) as e:  # the user's function: its failure (even sys.exit) is theirs to fix
            raise RlftError(f"scorer '{self.name}' raised {type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0][:200]}") from None
        return checked(self.name, scores, len(completions))


@contextmanager
def time_limit(seconds: float, message: str):
    """Raise RlftError(message) in this (main) thread if the block runs longer than `seconds` (0: no limit).
    SIGALRM is delivered to the main thread only: a block run in another thread has no limit."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise RlftError(message)
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def require_columns(scorer: Scorer, columns, source: str) -> None:
    """One line before any sampling when a function scorer needs a data column `source` does not have."""
    for part in parts_of(scorer):
        missing = sorted(getattr(part, "needs", set()) - set(columns) - {"completion_ids"})
        if missing:
            have = ", ".join(sorted(columns)) or "none but the prompt"
            raise RlftError(f"scorer '{part.name}' needs the data column(s) {', '.join(missing)}, which '{source}' has "
                            f"not (its other columns: {have}): add them, or give the function's argument a default")


def adapter_scorers(scorer: Scorer) -> list[AdapterScorer]:
    """The AdapterScorers in `scorer` (itself, or the parts of a weighted sum): PPO attaches them to its base."""
    return [part for part in parts_of(scorer) if isinstance(part, AdapterScorer)]


def parts_of(scorer: Scorer) -> list[Scorer]:
    """The scorers a weighted sum adds up, or `scorer` itself."""
    return [part for part, _ in scorer.parts] if isinstance(scorer, WeightedSum) else [scorer]


class WeightedSum:
    """sum_i weight_i * scorer_i(prompts, completions); `parts` lets a report show each term."""
    def __init__(self, parts: list[tuple[Scorer, float]]):
        self.parts = parts
        self.name = " + ".join(f"{weight:g}*{scorer.name}" for scorer, weight in parts)

    def __call__(self, prompts: list, completions: list[str], **columns: list) -> torch.Tensor:
        return sum(weight * scorer(prompts, completions, **columns) for scorer, weight in self.parts)
