"""Scorers: the one interface PPO and eval score completions through (reward_models.scorers)."""

import shutil
import signal

import pytest
import torch

from reward_models.scorers import ScorerConfig, WeightedSum, build_scorer, encode, score_ids
from rlft.config import ConfigError, from_dict
from rlft.errors import RlftError
from rlft.runs import write_json

PROMPTS = [[{"role": "user", "content": "how is the day ?"}], "tell me a story", [{"role": "user", "content": "hi"}]]
COMPLETIONS = ["a great day", "the cat is sad", "hello"]


@pytest.fixture
def judges_file(tmp_path):
    """A user's scorer file, imported by path (path/to/file.py:function)."""
    path = tmp_path / "my_judges.py"
    path.write_text(
        "import numpy as np\n"
        "def words(prompts, completions):\n    return np.array([len(c.split()) for c in completions])\n"
        "def greats(prompts, completions):\n    return [float(c.count('great')) for c in completions]\n"
        "def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n"
        "def one_short(prompts, completions):\n    return [0.0] * (len(completions) - 1)\n"
        "def column(prompts, completions):\n    return [[0.0]] * len(completions)\n"
        "def nothing(prompts, completions):\n    return None\n"
        "not_callable = 3\n"
    )
    return path


def function(path, name, weight=1.0):
    return ScorerConfig(kind="function", path=f"{path}:{name}", weight=weight)


def test_function_scorer_by_module_and_by_file(judges_file):
    sentiment = build_scorer([ScorerConfig(kind="function", path="reward_models.judges:sentiment")])
    assert sentiment.name == "sentiment"  # derived from the path
    scores = sentiment(PROMPTS, COMPLETIONS)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores[0] > 0 > scores[1]  # VADER: "great" is positive, "sad" negative

    words = build_scorer([function(judges_file, "words")])  # returns a numpy int array
    assert torch.equal(words(PROMPTS, COMPLETIONS), torch.tensor([3.0, 4.0, 1.0]))


def seconds_left(prompts, completions):
    """Each completion scores the seconds the call's alarm had left: what a hang would have before it ends."""
    return [signal.getitimer(signal.ITIMER_REAL)[0]] * len(completions)


def test_a_function_scorer_has_a_timeout_unless_told_none():
    """A hung scorer (a request that never returns) ends the run by default; timeout: 0 means no limit."""
    path = "tests.test_scorers:seconds_left"
    assert 290 < build_scorer([ScorerConfig(kind="function", path=path)])(PROMPTS, COMPLETIONS)[0] <= 300
    assert build_scorer([ScorerConfig(kind="function", path=path, timeout=0)])(PROMPTS, COMPLETIONS)[0] == 0
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0  # and no alarm is left behind


def test_weighted_sum_equals_weighted_parts(judges_file, tiny_reward_dir):
    """2 * words - 0.5 * greats: [2*3 - 0.5*1, 2*4 - 0, 2*1 - 0] = [5.5, 8, 2]; plus a model term."""
    scorer = build_scorer([function(judges_file, "words", 2.0), function(judges_file, "greats", -0.5)])
    assert isinstance(scorer, WeightedSum)
    assert torch.allclose(scorer(PROMPTS, COMPLETIONS), torch.tensor([5.5, 8.0, 2.0]))

    model = ScorerConfig(path=str(tiny_reward_dir))
    mixed = build_scorer([ScorerConfig(path=str(tiny_reward_dir), weight=0.3), function(judges_file, "words", 2.0)])
    expected = 0.3 * build_scorer([model])(PROMPTS, COMPLETIONS) + torch.tensor([6.0, 8.0, 2.0])
    assert torch.allclose(mixed(PROMPTS, COMPLETIONS), expected, atol=1e-6)
    # a lone scorer's weight still applies
    assert torch.allclose(build_scorer([function(judges_file, "words", 3.0)])(PROMPTS, COMPLETIONS),
                          torch.tensor([9.0, 12.0, 3.0]))


def test_model_scorer_matches_the_model_on_encoded_pairs(tiny_reward_dir):
    """The scorer is exactly the model on `encode` ids, whatever the batch size (padding is masked)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scores = build_scorer([ScorerConfig(path=str(tiny_reward_dir), batch_size=2)])(PROMPTS, COMPLETIONS)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_dir)
    with torch.no_grad():
        one_by_one = [model(input_ids=torch.tensor([encode(tokenizer, p, c, 512)])).logits[0, 0]
                      for p, c in zip(PROMPTS, COMPLETIONS)]
    assert torch.allclose(scores, torch.stack(one_by_one), atol=1e-5)
    assert len(set(scores.tolist())) == 3  # a random head still tells the inputs apart


def test_normalization_is_applied(tiny_reward_dir, tmp_path):
    folder = tmp_path / "rm"
    shutil.copytree(tiny_reward_dir, folder)
    raw = build_scorer([ScorerConfig(path=str(folder))])(PROMPTS, COMPLETIONS)
    with pytest.raises(RlftError, match="normalization.json"):  # asked for, but not there
        build_scorer([ScorerConfig(path=str(folder), normalize=True)])
    write_json(folder / "normalization.json", {"mean": 0.25, "std": 2.0})
    normalized = build_scorer([ScorerConfig(path=str(folder), normalize=True)])(PROMPTS, COMPLETIONS)
    assert torch.allclose(normalized, (raw - 0.25) / 2.0, atol=1e-6)


def test_encode_formats_a_plain_transcript_without_chat_template():
    """MiniLM (BERT) has no chat template: [CLS] role: content [SEP] completion [SEP], longer part cut first."""
    from transformers import AutoTokenizer

    from rlft.models import MINILM, resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(MINILM))
    assert tokenizer.chat_template is None
    ids = encode(tokenizer, [{"role": "user", "content": "How are you?"}], "Great!", 512)
    assert tokenizer.decode(ids) == "[CLS] user : how are you? [SEP] great! [SEP]"
    ids = encode(tokenizer, "word " * 100, "a happy reply", 16)
    assert len(ids) == 16 and tokenizer.decode(ids).endswith("[SEP] a happy reply [SEP]")


def test_encode_uses_the_chat_template_and_keeps_the_end(tiny_reward_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_dir)
    prompt = [{"role": "user", "content": "hi"}]
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "good day"}], tokenize=True,
                                         return_dict=True)["input_ids"]
    assert encode(tokenizer, prompt, "good day", 512) == list(full)
    assert encode(tokenizer, prompt, "good day", 4) == list(full[-4:])  # a causal head reads the last token


def test_score_ids_is_order_independent(tiny_reward_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir)
    ids = [[4, 5, 6, 7, 8], [9], [10, 11]]
    batched = score_ids(model, ids, pad_token_id=0, batch_size=2)
    alone = torch.cat([score_ids(model, [row], 0, 1) for row in ids])
    assert torch.allclose(batched, alone, atol=1e-5)


@pytest.mark.parametrize("path, problem", [
    ("no_such_module_xyz:score", "does not import: ModuleNotFoundError"),
    ("reward_models.judges:no_such_function", "does not import: AttributeError"),
    ("missing/file.py:score", "does not import: FileNotFoundError"),
])
def test_scorer_path_that_does_not_import(path, problem):
    with pytest.raises(RlftError, match=problem):
        build_scorer([ScorerConfig(kind="function", path=path)])


@pytest.mark.parametrize("name, problem", [
    ("nan", "scorer 'nan' returned 3 NaN/inf scores of 3"),
    ("one_short", r"scorer 'one_short' returned shape \(2,\) for 3 completions"),
    ("column", r"scorer 'column' returned shape \(3, 1\) for 3 completions"),
    ("nothing", "scorer 'nothing' returned NoneType, not numbers"),
])
def test_bad_scores_name_the_scorer(judges_file, name, problem):
    scorer = build_scorer([function(judges_file, name)])
    with pytest.raises(RlftError, match=problem):
        scorer(PROMPTS, COMPLETIONS)


def test_not_callable_and_config_checks(judges_file):
    with pytest.raises(RlftError, match="is a int, not a function"):
        build_scorer([function(judges_file, "not_callable")])
    with pytest.raises(RlftError, match="repeat"):
        build_scorer([function(judges_file, "words"), function(judges_file, "words")])
    with pytest.raises(ConfigError, match="set kind: function"):  # a function path given as a model
        from_dict(ScorerConfig, {"path": "reward_models.judges:sentiment"})
    with pytest.raises(ConfigError, match="'path'"):
        from_dict(ScorerConfig, {"kind": "function", "path": ""})
