"""Datasets in: local files, hub datasets, and built-in offline datasets; the row formats TRL users know.

Row formats (TRL's names):
- conversational: a `messages` column of [{"role", "content"}, ...]
- prompt-completion: `prompt` and `completion` columns, strings or message lists
- language modeling: a `text` column
- preference: `chosen` and `rejected` (plus an optional `prompt`), strings or message lists
"""

from __future__ import annotations

import codecs
import glob
import importlib.util
import json
import os
import random
from pathlib import Path

import yaml

from reward_models.judges import pick_pair, sentiment
from rlft import hub
from rlft.arithmetic import arithmetic_rows
from rlft.config import DataConfig
from rlft.errors import RlftError

FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN = ("chatterbot", "chatterbot-sentiment", "arithmetic")
FORMATS = {
    "conversational": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
    "prompt_only": ("prompt",),
}


def chatterbot_pairs() -> list[dict]:
    """English dialog pairs from the `chatterbot-corpus` package: each statement and its reply."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise RlftError("the built-in 'chatterbot' dataset needs the package: pip install chatterbot-corpus")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    rows, seen = [], set()
    for file in sorted(glob.glob(str(folder / "*.yml"))):
        for conversation in yaml.safe_load(Path(file).read_text())["conversations"]:
            turns = [str(t).strip() for t in conversation]
            for statement, reply in zip(turns, turns[1:]):
                if statement and reply and (statement, reply) not in seen:
                    seen.add((statement, reply))
                    rows.append(
                        {
                            "prompt": [{"role": "user", "content": statement}],
                            "completion": [{"role": "assistant", "content": reply}],
                        }
                    )
    return rows


def chatterbot_sentiment_pairs(split: str = "train", alternatives: int = 3, min_gap: float = 0.3) -> list[dict]:
    """The built-in offline preference dataset `chatterbot-sentiment`: ~670 train and ~150 test pairs.

    Chatterbot prompts mostly have one reply (104 of 1038 have two or more, and only 41 of those differ
    in sentiment by 0.3), so each prompt's candidates are its own replies plus `alternatives` replies
    drawn (seeded) from other prompts, and the VADER judge's best and worst candidates form the pair when
    their compound scores differ by >= min_gap. The signal is the sentiment of the reply, learnable from
    its words. 20% of the prompts form `test`; its alternatives come from test replies that never occur
    in train, so held-out accuracy measures unseen text, not memorised replies.
    """
    if split not in ("train", "test"):
        raise RlftError(f"the built-in 'chatterbot-sentiment' dataset has splits train and test, not '{split}'")
    groups: dict[str, list[str]] = {}
    for row in chatterbot_pairs():
        groups.setdefault(row["prompt"][0]["content"], []).append(row["completion"][0]["content"])
    order = sorted(groups)
    random.Random(0).shuffle(order)
    cut = len(order) // 5
    part = order[:cut] if split == "test" else order[cut:]
    train_replies = {reply for prompt in order[cut:] for reply in groups[prompt]}
    pool = {reply for prompt in part for reply in groups[prompt]}
    pool = sorted(pool - train_replies) if split == "test" else sorted(pool)
    rng, rows = random.Random(0), []
    for prompt in part:
        own = [reply for reply in groups[prompt] if reply in pool]
        candidates = list(dict.fromkeys(own + rng.sample(pool, alternatives)))
        row = pick_pair([{"role": "user", "content": prompt}], candidates, sentiment(None, candidates), min_gap)
        if row is not None:
            rows.append(row)
    return rows


def load_any(path: str, subset: str = "", split: str = "train"):
    """Load one split from a built-in name, a local file or directory, or the hub."""
    import datasets

    if path == "chatterbot":
        return datasets.Dataset.from_list(chatterbot_pairs())
    if path == "chatterbot-sentiment":  # preference pairs ranked by VADER; splits train and test
        return datasets.Dataset.from_list(chatterbot_sentiment_pairs(split))
    if path == "arithmetic":  # problems with known answers (rlft/arithmetic.py)
        return datasets.Dataset.from_list(arithmetic_rows())
    local = Path(path)
    if local.is_file() or local.suffix in FILE_TYPES:  # "org/name" without a file type is a hub name
        return load_file(local, split)
    try:
        if local.is_dir():
            return datasets.load_from_disk(path) if (local / "dataset_info.json").exists() else \
                datasets.load_dataset(path, split=split)

        hub.offline()  # one quick probe instead of a minute of retries
        return datasets.load_dataset(path, subset or None, split=split)
    except Exception as e:
        if local.exists():
            raise RlftError(f"could not read dataset '{path}': {first_line(e)}") from None

        where = "and the hub is unreachable (offline)" if hub.offline() else f"and not on the hub ({first_line(e)})"
        raise RlftError(
            f"dataset '{path}' not found: not a local file or folder, not built in ({', '.join(BUILTIN)}), "
            f"{where}. Check data.path"
        ) from None


def load_file(local: Path, split: str):
    """One local .jsonl/.json/.csv/.parquet file as the `train` split; a bad row is named by its line."""
    import datasets

    if not local.is_file():
        raise RlftError(f"data file '{local}' not found: check data.path (or the path you passed)")
    if local.suffix not in FILE_TYPES:
        raise RlftError(f"data file '{local}' has type '{local.suffix or '(none)'}', which rlft does not read: "
                        f"convert it to one of {', '.join(FILE_TYPES)}")
    if local.stat().st_size == 0:
        raise RlftError(f"data file '{local}' is empty: it needs at least one row")
    if split != "train":
        raise RlftError(f"data file '{local}' has one split (train), not '{split}': hold out rows with "
                        "data.eval_fraction and data.eval_split=''")
    if local.suffix in (".jsonl", ".json", ".csv"):
        not_utf8(local)
    if local.suffix == ".jsonl":
        bad_jsonl_line(local)
    try:
        return datasets.load_dataset(FILE_TYPES[local.suffix], data_files=str(local), split="train")
    except Exception as e:  # the datasets library raises many types for a malformed file
        raise RlftError(f"could not read data file '{local}': {first_line(e)}") from None


def not_utf8(path: Path) -> None:
    """Refuse a text data file that is not UTF-8 (a Latin-1 export), naming the first bad byte."""
    offset = 0
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise RlftError(f"data file '{path}' is not UTF-8 text (byte {chunk[e.start]:#x} at offset "
                                f"{offset + e.start}): save it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise RlftError(f"data file '{path}' is not UTF-8 text (it ends inside a character): save it as UTF-8") from None


def bad_jsonl_line(path: Path) -> None:
    """Refuse a JSON Lines file whose line is not a JSON object, naming the line (datasets names none)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RlftError(f"data file '{path}' line {number} is not valid JSON ({e.msg} at column {e.colno}): "
                                "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise RlftError(f"data file '{path}' line {number} is a {type(row).__name__}, not a JSON object "
                                "with named columns")


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def detect_format(dataset, allowed: tuple[str, ...], what: str = "data") -> str:
    """Name the first format in `allowed` whose columns the dataset has; else one line naming both."""
    columns = set(dataset.column_names)
    for name in allowed:
        if set(FORMATS[name]) <= columns:
            return name
    wanted = " or ".join("+".join(FORMATS[name]) for name in allowed)
    raise RlftError(
        f"{what} has columns {sorted(columns)} but needs {wanted}: rename the columns or pick another dataset"
    )


def check_rows(dataset, columns: tuple[str, ...], source: str) -> None:
    """Refuse null cells (a row would fail deep inside tokenization) and a column of nothing but empty text."""
    for column in columns:
        values = dataset[column]
        for row, value in enumerate(values):
            if value is None or (isinstance(value, list) and not value):
                kind = "a null" if value is None else "an empty"
                raise RlftError(f"'{source}' row {row} has {kind} `{column}`: drop or fill such rows")
            if isinstance(value, list):
                bad = next((m for m in value if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     and isinstance(m.get("content"), str))), None)
                if bad is not None:
                    raise RlftError(f"'{source}' row {row}: a `{column}` message ({str(bad)[:60]}) lacks a text `role` "
                                    "or `content`: every message needs both")
            elif not isinstance(value, str):
                raise RlftError(f"'{source}' row {row} has a {type(value).__name__} `{column}` ({str(value)[:40]}), "
                                "not text or a message list: quote it as a string")
        if all(isinstance(value, str) and not value.strip() for value in values):
            raise RlftError(f"every `{column}` in '{source}' is empty text: point data.path at rows with content")


def require_chat_template(tokenizer, model_name: str) -> None:
    """Message lists need a chat template; base models often ship none. Said before the model loads."""
    if not tokenizer.chat_template:
        raise RlftError(
            f"the tokenizer of '{model_name}' has no chat template and the data are message lists: set "
            "model.chat_template=plain (a User:/Assistant: transcript), chatml, or a Jinja template of your own"
        )


def read_split(config: DataConfig, allowed: tuple[str, ...], what: str = "data"):
    """(rows, format) of the training split, every row checked: what `rlft plan` reads, and `load_splits` first."""
    rows = load_any(config.path, config.subset, config.split)
    if len(rows) == 0:
        raise RlftError(f"dataset '{config.path}' (split '{config.split}') is empty: point data.path at rows")
    data_format = detect_format(rows, allowed, what)
    check_rows(rows, FORMATS[data_format], config.path)
    return rows, data_format


def load_splits(config: DataConfig, allowed: tuple[str, ...], seed: int = 0, what: str = "data"):
    """(train, eval, format) for a stage. Eval is `eval_split`, or a seeded hold-out of `split`."""
    train, data_format = read_split(config, allowed, what)
    if config.eval_split:
        evaluation = load_any(config.path, config.subset, config.eval_split)
        check_rows(evaluation, FORMATS[data_format], f"{config.path} ({config.eval_split})")
    else:
        if len(train) < 2:
            raise RlftError(f"dataset '{config.path}' has {len(train)} row: need at least 2 to hold one out")
        train, evaluation = hold_out(train, config.eval_fraction, seed)
    if config.max_samples:
        train = train.shuffle(seed=seed).select(range(min(config.max_samples, len(train))))
    if config.max_eval_samples:
        evaluation = evaluation.select(range(min(config.max_eval_samples, len(evaluation))))
    return train, evaluation, data_format


def prompt_key(prompt) -> str:
    """One string per distinct prompt, text or message list: what makes two rows share a prompt."""
    return json.dumps(prompt, sort_keys=True)


def hold_out(dataset, fraction: float, seed: int):
    """(train, eval): a seeded share of the rows held out, whole prompts at a time where prompts repeat.

    Rows that share a prompt (several preference pairs per prompt, several replies to one statement) all
    fall on one side, so the held-out figures are on prompts training never saw. Data without repeats
    split exactly as `train_test_split` splits them."""
    import datasets

    prompts = dataset["prompt"] if "prompt" in dataset.column_names else range(len(dataset))
    keys = [prompt_key(prompt) for prompt in prompts]
    unique = list(dict.fromkeys(keys))
    if len(unique) == len(keys) or len(unique) < 2:  # one prompt for every row: only rows can be held out
        parts = dataset.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]
    held = datasets.Dataset.from_dict({"key": unique}).train_test_split(test_size=fraction, seed=seed)["test"]
    held = set(held["key"])
    inside = [i for i, key in enumerate(keys) if key in held]
    outside = [i for i, key in enumerate(keys) if key not in held]
    return dataset.select(outside), dataset.select(inside)


def to_prompt_completion(dataset):
    """Split `messages` rows at the last assistant turn, so loss falls on the final reply only."""
    def split(row):
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise RlftError("a `messages` row has no assistant reply after a prompt: each row needs one")
        return {"prompt": messages[:last], "completion": messages[last : last + 1]}

    return dataset.map(split, remove_columns=dataset.column_names)


def prompts_of(dataset) -> list:
    """The raw prompts of a dataset: strings, or message lists (from `prompt`, or `messages` minus the reply)."""
    data_format = detect_format(dataset, ("prompt_only", "conversational"), "prompt data")
    if data_format == "conversational":
        dataset = to_prompt_completion(dataset)
    prompts = list(dataset["prompt"])
    if not prompts:
        raise RlftError("the prompt dataset is empty: point data.path at rows with a `prompt` column")
    return prompts


# Not passed on to scorers: the prompt and replies themselves, and the names scorers already take positionally
# or from the sampler (a scorer's completion_ids are the sampled reply's, never the data's)
REPLY_COLUMNS = ("prompt", "messages", "completion", "chosen", "rejected", "prompts", "completions", "completion_ids")


def columns_of(dataset) -> dict[str, list]:
    """The data's other columns (a verifiable `answer`, a test case, ...), each aligned with prompts_of(dataset):
    function scorers receive the ones they name as keyword arguments, as TRL's reward functions do."""
    return {name: list(dataset[name]) for name in dataset.column_names if name not in REPLY_COLUMNS}


def rows_of(columns: dict[str, list], indices) -> dict[str, list]:
    """`columns` at `indices` (a list of row numbers, in order, repeats allowed)."""
    return {name: [values[i] for i in indices] for name, values in columns.items()}


def render_prompts(tokenizer, prompts: list) -> list[str]:
    """Prompt strings ready for generation: message lists go through the tokenizer's chat template."""
    if any(not isinstance(prompt, str) for prompt in prompts):
        require_chat_template(tokenizer, tokenizer.name_or_path)
    return [
        prompt if isinstance(prompt, str)
        else tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        for prompt in prompts
    ]


def split_pair(row: dict) -> list[tuple]:
    """[(prompt, chosen completion), (prompt, rejected completion)] for any of TRL's preference shapes.

    Explicit `prompt`, or implicit: message lists end in the reply; texts share a prefix, cut at its last
    space ("The sky is blue." / "The sky is green." -> "The sky is", "blue." / "green."). A text prompt beside
    message lists (UltraFeedback's layout) is the lists' own user turn.
    """
    prompt, sides = row.get("prompt"), [row["chosen"], row["rejected"]]
    if all(isinstance(side, str) for side in sides):
        if prompt is None:
            cut = os.path.commonprefix(sides).rfind(" ") + 1
            prompt, sides = sides[0][:cut].strip(), [side[cut:] for side in sides]
        return [(prompt, side) for side in sides]
    if all(isinstance(side, list) and side for side in sides) and isinstance(prompt, str):
        # HuggingFaceH4/ultrafeedback_binarized: the prompt as text, and each side the whole conversation again
        # (its user turn then the reply); sides holding the reply alone get the prompt as the user's turn
        return [(side[:-1] or [{"role": "user", "content": prompt}], side[-1]["content"]) for side in sides]
    if all(isinstance(side, list) and side for side in sides) and isinstance(prompt, (list, type(None))):
        return [((prompt or []) + side[:-1], side[-1]["content"]) for side in sides]
    raise RlftError(
        "a preference row mixes text and message lists, or has an empty side: chosen/rejected must both be "
        f"strings or both non-empty message lists, with a prompt of the same kind (got {str(row)[:120]}...)"
    )
