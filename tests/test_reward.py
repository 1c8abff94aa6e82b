"""`rlft reward`: Bradley-Terry reward models on preference pairs (reward_models/train.py)."""

import json
import random
from pathlib import Path

import pytest
import torch

from reward_models.scorers import ScorerConfig, build_scorer, encode
from reward_models.train import RewardConfig, run, tokenize_pairs
from rlft.data import split_pair
from rlft.cli import main
from rlft.config import ConfigError, load_config
from rlft.data import load_splits
from rlft.errors import RlftError
from rlft.runs import read_json

CONFIGS = Path(__file__).parents[1] / "configs"
FILLER = "the a cat dog sun rain day night is very big small red blue one two".split()


def write_marker_pairs(path: Path, count: int, seed: int = 0, numbered: bool = False) -> Path:
    """Chosen replies contain "great"; rejected ones the same number of filler words, so length gives nothing away.
    Random prompts repeat now and then (hold-outs keep a prompt's pairs together); `numbered` ones never do."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            statement = " ".join(rng.choices(FILLER, k=3))
            prompt = [{"role": "user", "content": f"{statement} {i}" if numbered else statement}]
            words = rng.choices(FILLER, k=4)
            chosen = words[:]
            chosen.insert(rng.randrange(5), "great")
            rejected = words[:]
            rejected.insert(rng.randrange(5), rng.choice(FILLER))
            row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": " ".join(chosen)}],
                   "rejected": [{"role": "assistant", "content": " ".join(rejected)}]}
            f.write(json.dumps(row) + "\n")
    return path


def tiny_config(backbone, data, out, *overrides) -> RewardConfig:
    return load_config(RewardConfig, None, [
        f"model.name_or_path={backbone}", f"data.path={data}", f"output_dir={out}", "data.eval_fraction=0.2",
        "train.epochs=4", "train.batch_size=16", "train.learning_rate=2e-3", "train.warmup_ratio=0",
        "train.logging_steps=5", *overrides,
    ])


def test_tiny_bert_learns_a_marker_word_and_its_scorer_agrees(tiny_reward_dir, tmp_path):
    """Through run(): held-out accuracy goes from chance to >= 90%, and the saved model, loaded as a
    `kind: model` scorer, ranks the same held-out pairs the same way (training and scoring share a format)."""
    pairs = write_marker_pairs(tmp_path / "pairs.jsonl", 200)
    config = tiny_config(tiny_reward_dir, pairs, tmp_path / "rm", "train.max_length=40")
    metrics = run(config)
    assert metrics["eval_accuracy_after"] >= 0.9, metrics
    assert metrics["eval_accuracy_after"] > metrics["eval_accuracy_before"]
    assert read_json(tmp_path / "rm" / "metrics.json") == metrics
    assert metrics["wall_time_s"] > 0 and metrics["peak_rss_mb"] > 0

    train, held_out, _ = load_splits(config.data, ("preference",), config.seed)
    scorer = build_scorer([ScorerConfig(path=str(tmp_path / "rm"))])
    assert scorer.max_length == 40  # the saved tokenizer carries train.max_length: it truncates where training did
    prompts = list(held_out["prompt"])
    chosen = scorer(prompts, [row[0]["content"] for row in held_out["chosen"]])
    rejected = scorer(prompts, [row[0]["content"] for row in held_out["rejected"]])
    assert (chosen > rejected).float().mean().item() == pytest.approx(metrics["eval_accuracy_after"])

    # normalization.json: mean 0, std 1 over the training completions, as the scorer applies it
    normalized = build_scorer([ScorerConfig(path=str(tmp_path / "rm"), normalize=True)])
    prompts = list(train["prompt"]) * 2
    completions = [row[0]["content"] for row in list(train["chosen"]) + list(train["rejected"])]
    scores = normalized(prompts, completions)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-4)


def test_lora_reward_model_is_a_peft_adapter_that_plain_peft_loads(tiny_reward_dir, tmp_path):
    """With lora_enabled the folder is the adapter and its score head in peft's format (no merged copy of the
    backbone); plain peft rebuilds the model, and the `kind: model` scorer scores exactly as it does."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    data = write_marker_pairs(tmp_path / "pairs.jsonl", 40)
    run(tiny_config(tiny_reward_dir, data, tmp_path / "rm", "lora_enabled=true", "train.max_steps=3", "lora.r=4"))
    assert (tmp_path / "rm" / "adapter_config.json").is_file() and not (tmp_path / "rm" / "model.safetensors").exists()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir, num_labels=1)
    untrained_head = base.classifier.weight.clone()
    model = PeftModel.from_pretrained(base, tmp_path / "rm").eval()
    moved = {name for name, p in model.named_parameters() if ("lora_B" in name or "modules_to_save" in name) and p.abs().sum() > 0}
    assert any("lora_B" in name for name in moved)
    assert not torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, untrained_head)

    scorer = build_scorer([ScorerConfig(path=str(tmp_path / "rm"))])
    prompts, completions = ["hello", "how are you"], ["good day", "bad"]
    ids = [encode(scorer.tokenizer, p, c, scorer.max_length) for p, c in zip(prompts, completions)]
    with torch.no_grad():
        expected = torch.stack([model(input_ids=torch.tensor([row])).logits[0, 0] for row in ids])
    torch.testing.assert_close(scorer(prompts, completions), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("row, expected", [
    # explicit prompt, plain text
    ({"prompt": "hi", "chosen": "good", "rejected": "bad"}, [("hi", "good"), ("hi", "bad")]),
    # implicit prompt, plain text: cut at the last space of the shared prefix
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."},
     [("The sky is", "blue."), ("The sky is", "green.")]),
    # implicit prompt, messages: everything before the last turn
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     [([{"role": "user", "content": "q"}], "a"), ([{"role": "user", "content": "q"}], "b")]),
    # explicit message prompt with plain-text replies
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
     [([{"role": "user", "content": "q"}], "a"), ([{"role": "user", "content": "q"}], "b")]),
    # HuggingFaceH4/ultrafeedback_binarized: a text prompt, and sides that repeat it as their user turn
    ({"prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     [([{"role": "user", "content": "q"}], "a"), ([{"role": "user", "content": "q"}], "b")]),
    # a text prompt beside sides that hold the reply alone
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]},
     [([{"role": "user", "content": "q"}], "a"), ([{"role": "user", "content": "q"}], "b")]),
])
def test_split_pair_handles_trl_preference_shapes(row, expected):
    assert split_pair(row) == expected


def test_split_pair_refuses_mixed_rows():
    with pytest.raises(RlftError, match="mixes text and message lists"):
        split_pair({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"})


def test_the_ultrafeedback_layout_trains(tiny_reward_dir, tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized's rows (a `prompt` string, `chosen`/`rejected` message lists that
    repeat it, scores beside) through rlft reward."""
    from tests.tiny import WORDS

    rows = []
    for i in range(24):
        prompt = " ".join(WORDS[i % 9: i % 9 + 3])
        rows.append({"prompt": prompt, "prompt_id": str(i), "score_chosen": 8.0, "score_rejected": 3.0,
                     "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "great good yes"}],
                     "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "bad no sad"}]})
    path = tmp_path / "ultrafeedback.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = run(load_config(RewardConfig, Path(__file__).parents[1] / "configs" / "tiny" / "reward.yaml", [
        f"model.name_or_path={tiny_reward_dir}", f"data.path={path}", f"output_dir={tmp_path / 'rm'}"]))
    assert metrics["steps"] == 8


def test_margin_column_reaches_the_trainer(tiny_reward_dir):
    """TRL subtracts `margin` inside the loss; tokenizing must keep it (and drop the text columns)."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_dir)
    rows = datasets.Dataset.from_list([{"prompt": "hi", "chosen": "good", "rejected": "bad", "margin": 0.5}])
    tokenized = tokenize_pairs(rows, tokenizer, 512)
    assert sorted(tokenized.column_names) == ["chosen_ids", "length", "margin", "rejected_ids"]
    assert tokenized[0]["chosen_ids"] == encode(tokenizer, "hi", "good", 512) and tokenized[0]["margin"] == 0.5


def test_missing_columns_exit_2_with_one_line(tiny_reward_dir, tmp_path, capsys):
    import datasets

    datasets.disable_progress_bars()  # their bars share stderr; the CLI leaves them on (see the report)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    code = main(["reward", f"model.name_or_path={tiny_reward_dir}", f"data.path={data}", f"output_dir={tmp_path}/rm"])
    datasets.enable_progress_bars()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "needs chosen+rejected" in err[0] and err[0].startswith("rlft reward: error:")


@pytest.mark.parametrize("setup, problem", [
    (lambda d: d.write_text(""), "is empty"),
    (lambda d: d.write_text(json.dumps({"chosen": "a"}) + "\n"), r"needs chosen\+rejected"),
])
def test_bad_data_is_an_rlft_error(tiny_reward_dir, tmp_path, setup, problem):
    data = tmp_path / "pairs.jsonl"
    setup(data)
    with pytest.raises(RlftError, match=problem):
        run(tiny_config(tiny_reward_dir, data, tmp_path / "rm"))


def test_eval_split_of_a_single_file_is_refused(tiny_reward_dir, tmp_path):
    """A local file has one split: eval_split=test would silently evaluate on the training rows."""
    data = write_marker_pairs(tmp_path / "pairs.jsonl", 4)
    with pytest.raises(RlftError, match="has one split"):
        run(tiny_config(tiny_reward_dir, data, tmp_path / "rm", "data.eval_split=test"))


def test_config_defaults_and_checks(tmp_path):
    config = load_config(RewardConfig, CONFIGS / "reward.yaml")
    assert config.model.name_or_path == "all-minilm-l6-v2" and config.data.path == "chatterbot-sentiment"
    # A partial model section keeps the reward backbone default (not the SFT model's).
    assert load_config(RewardConfig, None, ["model.dtype=float32"]).model.name_or_path == "all-minilm-l6-v2"
    with pytest.raises(ConfigError, match="lora_enabled"):
        load_config(RewardConfig, None, ["model.quantization=4bit"])


@pytest.mark.slow
def test_default_config_trains_minilm_well_past_chance(tmp_path):
    """The shipped config for real, one epoch instead of two: the embedded MiniLM on chatterbot-sentiment.

    (The full config reaches 0.80 held-out accuracy from 0.41; see the closing notes for its timing.)
    """
    metrics = run(load_config(RewardConfig, CONFIGS / "reward.yaml", [f"output_dir={tmp_path}/rm", "train.epochs=1"]))
    assert metrics["eval_accuracy_after"] >= 0.7 and metrics["eval_accuracy_after"] > metrics["eval_accuracy_before"] + 0.15, metrics


def test_score_margin_is_the_judges_gap_and_needs_its_scores():
    import datasets

    from reward_models.train import with_score_margin

    pairs = datasets.Dataset.from_list([{"chosen": "a", "rejected": "b", "score_chosen": 0.75, "score_rejected": -0.25},
                                        {"chosen": "c", "rejected": "d", "score_chosen": 0.5, "score_rejected": 0.375}])
    assert with_score_margin(pairs, 2.0, "p.jsonl")["margin"] == [2.0, 0.25]
    with pytest.raises(RlftError, match="no score_chosen or score_rejected column"):
        with_score_margin(pairs.remove_columns(["score_chosen", "score_rejected"]), 1.0, "p.jsonl")
    with pytest.raises(RlftError, match="already has a `margin` column"):
        with_score_margin(with_score_margin(pairs, 1.0, "p.jsonl"), 1.0, "p.jsonl")
    with pytest.raises(ConfigError, match="score_margin"):
        load_config(RewardConfig, None, ["score_margin=-1"])


def test_min_score_gap_trains_on_clear_pairs_and_keeps_every_held_out_pair(tiny_reward_dir, tmp_path):
    """Pairs the judge barely separates leave the training side only: the held-out pairs, and so what accuracy
    is measured on, are the same with or without the gap."""
    import datasets

    from reward_models.train import clear_pairs

    # gaps 1.0, 0.125 and 0.25: at 0.2, the second pair is a near-tie and goes
    pairs = datasets.Dataset.from_list([{"chosen": "a", "rejected": "b", "score_chosen": 0.75, "score_rejected": -0.25},
                                        {"chosen": "c", "rejected": "d", "score_chosen": 0.5, "score_rejected": 0.375},
                                        {"chosen": "e", "rejected": "f", "score_chosen": 0.25, "score_rejected": 0.0}])
    assert clear_pairs(pairs, 0.2, "p.jsonl")["chosen"] == ["a", "e"]
    with pytest.raises(RlftError, match="no score_chosen or score_rejected column"):
        clear_pairs(pairs.remove_columns(["score_chosen", "score_rejected"]), 0.2, "p.jsonl")
    with pytest.raises(RlftError, match="lower min_score_gap"):
        clear_pairs(pairs, 2.0, "p.jsonl")

    rows = [json.loads(line) for line in write_marker_pairs(tmp_path / "pairs.jsonl", 64, numbered=True).read_text()
            .splitlines()]
    for i, row in enumerate(rows):  # a judge's scores: every third pair a near-tie
        row.update(score_chosen=0.5, score_rejected=0.45 if i % 3 == 0 else 0.0)
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    every = run(tiny_config(tiny_reward_dir, tmp_path / "scored.jsonl", tmp_path / "every", "train.max_steps=2"))
    clear = run(tiny_config(tiny_reward_dir, tmp_path / "scored.jsonl", tmp_path / "clear", "train.max_steps=2",
                            "min_score_gap=0.2"))
    assert clear["eval_rows"] == every["eval_rows"] and clear["train_rows"] < every["train_rows"]
