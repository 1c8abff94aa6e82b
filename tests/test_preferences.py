"""`rlft preferences` and the built-in `chatterbot-sentiment` pairs (reward_models/preferences.py)."""

import json
from pathlib import Path

import pytest

from reward_models.judges import every_pair, pick_pair, sentiment
from reward_models.preferences import PreferenceConfig, run
from rlft.data import chatterbot_sentiment_pairs
from rlft.config import ConfigError, DataConfig, load_config
from rlft.data import hold_out, load_any, load_splits
from rlft.errors import RlftError

CONFIGS = Path(__file__).parents[1] / "configs"


def write_prompts(path: Path, count: int) -> Path:
    words = "tell me about the cat dog sun rain day night".split()
    with open(path, "w") as f:
        for i in range(count):
            text = " ".join(words[i % 5 : i % 5 + 4]) + f" {i}"
            f.write(json.dumps({"prompt": [{"role": "user", "content": text}]}) + "\n")
    return path


def tiny_config(tmp_path, *overrides) -> PreferenceConfig:
    return load_config(PreferenceConfig, None, [
        f"data.path={write_prompts(tmp_path / 'prompts.jsonl', 20)}", f"output_dir={tmp_path}/prefs",
        "num_samples=4", "sampling.max_new_tokens=8", *overrides,
    ])


def read_pairs(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]


def test_pairs_from_a_tiny_policy_are_ranked_by_the_judge(tiny_lm_dir, tmp_path):
    """Every written pair: conversational TRL format, the judge's score for chosen beats rejected by >= min_gap,
    and the file feeds straight into the reward stage's data loading."""
    metrics = run(tiny_config(tmp_path, f"model.name_or_path={tiny_lm_dir}", "min_gap=0.3"))
    pairs = read_pairs(tmp_path / "prefs")
    assert 0 < len(pairs) == metrics["pairs"] <= metrics["prompts"] == 18  # 20 prompts less the 10% hold-out
    for pair in pairs:
        assert pair["prompt"][0]["role"] == "user"
        assert [m["role"] for m in pair["chosen"] + pair["rejected"]] == ["assistant", "assistant"]
        chosen, rejected = sentiment(None, [pair["chosen"][0]["content"], pair["rejected"][0]["content"]])
        assert (chosen, rejected) == pytest.approx((pair["score_chosen"], pair["score_rejected"]))
        assert chosen - rejected >= 0.3
    assert metrics["mean_gap"] == pytest.approx(sum(p["score_chosen"] - p["score_rejected"] for p in pairs) / len(pairs))
    *_, data_format = load_splits(DataConfig(path=str(tmp_path / "prefs" / "pairs.jsonl")), ("preference",))
    assert data_format == "preference"


def test_every_pair_of_samples(tiny_lm_dir, tmp_path):
    """pairs=all: up to K(K-1)/2 pairs per prompt, each separated by min_gap, from prompts training holds out whole."""
    metrics = run(tiny_config(tmp_path, f"model.name_or_path={tiny_lm_dir}", "min_gap=0.2", "pairs=all"))
    pairs = read_pairs(tmp_path / "prefs")
    assert metrics["prompts_with_pairs"] <= len(pairs) == metrics["pairs"] <= 6 * metrics["prompts_with_pairs"]
    assert all(p["score_chosen"] - p["score_rejected"] >= 0.2 and p["chosen"] != p["rejected"] for p in pairs)
    train, evaluation, _ = load_splits(DataConfig(path=str(tmp_path / "prefs" / "pairs.jsonl"), eval_fraction=0.3),
                                       ("preference",))
    assert not {json.dumps(p) for p in train["prompt"]} & {json.dumps(p) for p in evaluation["prompt"]}


def test_every_pair_ranks_distinct_texts():
    pairs = every_pair("q", ["a", "b", "c", "a"], [0.5, 0.9, -0.4, 0.5], 0.3)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "a"), ("b", "c"), ("a", "c")]
    assert [(p["chosen"], p["rejected"]) for p in every_pair("q", ["a", "b", "c"], [0.5, 0.9, -0.4], 0.5)] == [
        ("b", "c"), ("a", "c")]
    assert every_pair("q", ["a", "b"], [0.2, 0.2], 0.0) == []  # a tie says nothing


def test_hold_out_keeps_each_prompt_on_one_side():
    """Three pairs per prompt: every prompt's pairs land on one side, about `fraction` of the prompts held out;
    data whose prompts are all distinct split exactly as datasets' train_test_split does."""
    import datasets

    rows = [{"prompt": f"p{i}", "chosen": f"c{i}{j}", "rejected": f"r{i}{j}"} for i in range(30) for j in range(3)]
    train, evaluation = hold_out(datasets.Dataset.from_list(rows), 0.2, seed=1)
    assert len(set(evaluation["prompt"])) == 6 and len(evaluation) == 18 and len(train) == 72
    assert not set(train["prompt"]) & set(evaluation["prompt"])
    distinct = datasets.Dataset.from_list(rows[::3])
    parts = distinct.train_test_split(test_size=0.2, seed=1)
    assert [d["prompt"] for d in hold_out(distinct, 0.2, seed=1)] == [parts["train"]["prompt"], parts["test"]["prompt"]]


def test_samples_from_an_sft_adapter(tiny_lm_dir, tmp_path):
    """`policy` loads an rlft adapter folder (base + LoRA) instead of `model`."""
    from rlft.config import LoraConfig, ModelConfig
    from rlft.models import add_lora, load_model
    from rlft.policy import save_adapter

    base = ModelConfig(name_or_path=str(tiny_lm_dir))
    save_adapter(add_lora(load_model(base, device="cpu"), base, LoraConfig(r=4)), tmp_path / "sft", base, None)
    metrics = run(tiny_config(tmp_path, f"policy={tmp_path / 'sft'}", "model.name_or_path=does-not-exist"))
    assert metrics["pairs"] == len(read_pairs(tmp_path / "prefs")) > 0


def test_a_judge_that_does_not_import_fails_before_sampling(tmp_path):
    with pytest.raises(RlftError, match="does not import"):
        run(tiny_config(tmp_path, "model.name_or_path=never-loaded", 'judge=[{kind: function, path: "nope:f"}]'))


def test_pick_pair_skips_ties_and_small_gaps():
    prompt = [{"role": "user", "content": "q"}]
    assert pick_pair(prompt, ["a", "b"], [0.5, 0.5], 0.0) is None  # a tie says nothing
    assert pick_pair(prompt, ["a", "b"], [0.1, 0.3], 0.5) is None  # gap 0.2 < min_gap
    assert pick_pair(prompt, ["a", "a"], [0.1, 0.3], 0.0) is None  # same text twice: a noisy judge, no pair
    row = pick_pair(prompt, ["mid", "best", "worst"], [0.0, 0.9, -0.4], 0.5)
    assert row["chosen"] == [{"role": "assistant", "content": "best"}]
    assert row["rejected"] == [{"role": "assistant", "content": "worst"}]
    assert pick_pair("q", ["x", "y"], [1.0, 0.0], 0.0)["chosen"] == "x"  # text prompt: text replies


def test_builtin_chatterbot_sentiment_pairs():
    """Enough pairs, a real VADER gap in each, and a test split whose prompts and replies training never sees."""
    train, test = load_any("chatterbot-sentiment", split="train"), load_any("chatterbot-sentiment", split="test")
    assert len(train) >= 500 and len(test) >= 100
    assert all(row["score_chosen"] - row["score_rejected"] >= 0.3 for row in train)
    prompts = {split: {row["prompt"][0]["content"] for row in rows} for split, rows in (("train", train), ("test", test))}
    assert not prompts["train"] & prompts["test"]
    replies = {split: {row[side][0]["content"] for row in rows for side in ("chosen", "rejected")}
               for split, rows in (("train", train), ("test", test))}
    assert not replies["train"] & replies["test"]
    with pytest.raises(RlftError, match="splits train and test"):
        chatterbot_sentiment_pairs("validation")


def test_config_checks():
    config = load_config(PreferenceConfig, CONFIGS / "preferences.yaml")
    assert config.judge[0].path == "reward_models.judges:sentiment" and config.judge[0].kind == "function"
    with pytest.raises(ConfigError, match="num_samples"):
        load_config(PreferenceConfig, None, ["num_samples=1"])


@pytest.mark.slow
def test_shipped_config_with_smollm2(tmp_path):
    """configs/preferences.yaml on the real embedded SmolLM2, cut down to a handful of samples."""
    metrics = run(load_config(PreferenceConfig, CONFIGS / "preferences.yaml", [
        f"output_dir={tmp_path}", "data.max_samples=8", "num_samples=3", "sampling.max_new_tokens=16", "min_gap=0"]))
    assert metrics["pairs"] == len(read_pairs(tmp_path)) > 0
