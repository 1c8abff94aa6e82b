"""Typed run configs: dataclasses loaded from YAML plus `key.sub=value` command-line overrides.

Every stage's config is a tree of dataclasses whose fields carry a `help` string (see `option`). Loading
refuses unknown keys (with a suggestion), coerces and checks types, and runs each section's
`__post_init__` checks, all before any model is loaded. Shared sections (model, LoRA, data) live here;
each stage defines its own top-level config next to its code.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlft.errors import RlftError


class ConfigError(RlftError):
    pass


class ConfigValueError(ValueError):
    """Raised by a section's checks; the loader prefixes the dotted path of the section."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def option(default: Any, help: str):
    """A config field with its documentation. Mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(cls, help: str):
    """A nested config section."""
    return field(default_factory=cls, metadata={"help": help})


def require_seed(seed: int) -> None:
    """numpy and python seed from unsigned 32-bit integers."""
    require(0 <= seed < 2**32, "seed", f"must be in [0, 2**32), got {seed}")


def require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigValueError(key, problem)


# ---------------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class ModelConfig:
    name_or_path: str = option(
        "smollm2-135m-instruct",
        "HF hub id, local directory, or an embedded name (smollm2-135m-instruct, all-minilm-l6-v2) "
        "that works offline.",
    )
    revision: str = option("", "Hub revision (branch, tag or commit); empty for the default.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Weights/compute dtype of the base. auto: bfloat16 on a GPU that supports it or a CPU with "
        "AVX512-BF16/AMX-BF16 (several times float32's matmul rate), else float32. Adapters, optimiser state, "
        "log-probs, KL and losses are float32 either way."
    )
    quantization: Literal["none", "4bit", "8bit"] = option(
        "none", "Load the frozen base with bitsandbytes: 4bit (NF4, double quant) or 8bit = QLoRA."
    )
    gradient_checkpointing: bool = option(False, "Trade compute for activation memory.")
    trust_remote_code: bool = option(False, "Allow model code from the hub (only for models you trust).")
    attn_implementation: str = option("", "e.g. sdpa, eager, flash_attention_2; empty for the default.")
    chat_template: str = option(
        "", "How message lists become text: empty for the tokenizer's own template; for a base model without one, "
        "'plain' (a 'User: ...' / 'Assistant: ...' transcript), 'chatml', or a Jinja template of your own.",
    )


@dataclass
class LoraConfig:
    kind: Literal["lora", "ia3"] = option(
        "lora", "Adapter method: lora (LoRA, DoRA, rsLoRA), or ia3 ((IA)3: learned rescaling vectors, T-Few).")
    r: int = option(16, "LoRA rank.")
    alpha: int = option(32, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = option(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = option(
        ["all-linear"], "Module names to adapt, or ['all-linear'] for every linear layer but the head.")
    feedforward_modules: list[str] = option(
        [], "ia3: the target modules that are feed-forward layers (their input is scaled, not their output); "
        "empty with target_modules=[all-linear]: peft's per-architecture default.")
    bias: Literal["none", "all", "lora_only"] = option(
        "none", "Also train biases: all of them, or those of adapted layers. PPO refuses it: biases are base "
        "weights, so the reference (adapter off) would move too.")
    use_rslora: bool = option(False, "Rank-stabilised LoRA: scale by alpha / sqrt(r) (Kalajdzievski 2023).")
    use_dora: bool = option(False, "DoRA: learn each weight's magnitude apart from its direction (Liu et al. 2024).")
    init: Literal["default", "gaussian"] = option(
        "default", "LoRA A's initialisation (B starts at 0 either way, so the adapter starts as the identity). "
        "peft's PiSSA/OLoRA/LoftQ rewrite the base weights, which would move the reference, and are not offered.")

    def __post_init__(self):
        require(self.r > 0, "r", f"must be a positive integer rank, got {self.r} (try 8, 16 or 32)")
        require(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(len(self.target_modules) > 0, "target_modules", "must name at least one module")
        require(self.kind == "lora" or not (self.use_dora or self.use_rslora or self.bias != "none"), "kind",
                "use_dora, use_rslora and bias are LoRA options; (IA)3 has none of them")
        require(not self.feedforward_modules or set(self.feedforward_modules) <= set(self.target_modules),
                "feedforward_modules", "must be a subset of target_modules")


@dataclass
class DataConfig:
    path: str = option(
        "chatterbot",
        "A local .jsonl/.json/.csv/.parquet file or directory, an HF hub dataset name, or a built-in "
        "offline dataset (chatterbot: English dialog pairs; chatterbot-sentiment: VADER-ranked reply pairs).",
    )
    subset: str = option("", "Hub dataset configuration name (subset), if any.")
    split: str = option("train", "Split to train on.")
    eval_split: str = option("", "Split to evaluate on; empty: hold out eval_fraction of `split`.")
    eval_fraction: float = option(0.1, "Share of `split` held out for evaluation when eval_split is empty.")
    max_samples: int = option(0, "Use at most this many training rows (0: all).")
    max_eval_samples: int = option(0, "Use at most this many evaluation rows (0: all).")

    def __post_init__(self):
        require(bool(self.path), "path", "must name a file, a hub dataset or a built-in dataset")
        require(0 < self.eval_fraction < 1, "eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        require(self.max_samples >= 0, "max_samples", "must be >= 0 (0 means all)")
        require(self.max_eval_samples >= 0, "max_eval_samples", "must be >= 0 (0 means all)")


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()):
    """Build `cls` from an optional YAML file and `a.b=value` overrides (later ones win)."""
    data = read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(data, override)
    return from_dict(cls, data)


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping; `extends: other.yaml` (relative to this file) is read first and this one's
    keys are merged over it, section by section, so a variant states only what differs."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found: check the --config path"
                          + (f" (extended by '{seen[-1]}')" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' extends itself through {' -> '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values")
    if "extends" not in data:
        return data
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"config file '{path}': extends must name another YAML file, got {parent!r}")
    return merged(read_yaml(path.parent / parent, (*seen, path.resolve())), data)


def merged(base: dict, update: dict) -> dict:
    """`update` over `base`: mappings merge key by key, anything else (lists included) is replaced."""
    result = dict(base)
    for key, value in update.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) \
            else value
    return result


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{override}' is not of the form key.sub=value (e.g. lora.r=32)")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is a value, not a section")
    try:
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{override}': the value is not valid YAML ({yaml_problem(e, line=False)}); "
                          "quote it for the shell, e.g. 'reward=[{kind: function, path: m:f}]'") from None


def yaml_problem(error: yaml.YAMLError, line: bool = True) -> str:
    """The parser's complaint with its 1-based line and column, in one line."""
    mark = getattr(error, "problem_mark", None)
    problem = " ".join(str(part) for part in (getattr(error, "problem", None), getattr(error, "context", None)) if part)
    problem = problem or str(error).splitlines()[0]
    if mark is None:
        return problem
    where = f"line {mark.line + 1}, column {mark.column + 1}" if line else f"column {mark.column + 1}"
    return f"{problem} at {where}"


def from_dict(cls: type, data: dict, prefix: str = ""):
    """Recursively build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.')}' must be a section (a mapping), got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = from_dict(kind, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigValueError as e:
        raise ConfigError(f"bad value for '{prefix}{e.key}': {e.problem}") from None


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    bad = ConfigError(f"bad value for '{key}': expected {_type_name(kind)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"bad value for '{key}': {value!r} is not one of {list(args)}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    pass
        raise bad
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single item where a list is expected is a list of one
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad
        if not math.isfinite(value):  # .inf / .nan would only surface later, as NaN weights mid-run
            raise ConfigError(f"bad value for '{key}': must be a finite number, got {value}")
        return float(value)
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return " | ".join(map(str, typing.get_args(kind)))
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf field: the config reference in README and --help."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            rows += describe(kind, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}{f.name}", _type_name(kind), default, f.metadata.get("help", "")))
        element = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        if dataclasses.is_dataclass(element):  # a list of sections (scorers): each entry's keys, as reward[].path
            rows += describe(element, f"{prefix}{f.name}[].")
    return rows
