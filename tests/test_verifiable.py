"""Rewards a rule checks (reward_models.verifiable), and the data's columns reaching function scorers by name in
every stage that scores: PPO's rollouts, eval's report, the preference judge."""

import json

import pytest
import torch

from reward_models.scorers import ScorerConfig, build_scorer, require_columns
from reward_models.verifiable import accuracy, final_answer, format, normalize, overlong
from rlft.cli import main
from rlft.config import load_config
from rlft.errors import RlftError
from rlft.ppo.config import PPOConfig
from rlft.ppo.train import setup
from tests.test_ppo import TINY

VERIFIABLE = "reward_models.verifiable"


def test_final_answer_is_the_last_tagged_one_else_the_last_number():
    assert final_answer("3 + 4 = 7") == "7"
    assert final_answer("It is 7, or maybe 8") == "8"  # listing candidates: held to the last one
    assert final_answer("<answer>12</answer> then 99") == "12"  # a tag outranks any number after it
    assert final_answer("first \\boxed{5}, finally <answer> six </answer>") == " six "
    assert final_answer("no digits here") is None and final_answer("") is None
    assert final_answer("a loss of -3.5 dollars") == "-3.5"


def test_answers_compare_by_value_or_by_normalized_text():
    assert normalize("1,000") == normalize("1000.0") == normalize("+1000") == normalize(1000) == "1000"
    assert normalize("0.50") == normalize(".5") == "0.5"
    assert normalize("  Paris. ") == normalize("paris") == "paris"
    assert normalize("7") != normalize("71")


def test_accuracy_on_hand_made_and_adversarial_replies():
    prompts = ["What is 3 + 4?", "What is 3 + 4?", "What is 3 + 4?", "What is 3 + 4?",
               [{"role": "user", "content": "How many legs has a spider? Say 8 or 6."}],
               [{"role": "user", "content": "How many legs has a spider? Say 8 or 6."}], "Capital of France?"]
    completions = ["3 + 4 = 7", "7 or 8", "", "What is 3 + 4?",
                   "How many legs has a spider? Say 8 or 6.",  # the prompt echoed: its last number, 6, is the answer
                   "It has <answer>8</answer>, not 6", "<answer>paris</answer>"]
    answers = [7, "7", 7, "4", "6", 8, "Paris"]
    # right; hedged (held to 8); empty; echo of a prompt whose last number is "4"; echo; tagged; text answer
    assert accuracy(prompts, completions, answer=answers) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError):  # one answer per completion, or it is a bug in the data
        accuracy(prompts, completions, answer=answers[:-1])


def test_format_matches_the_whole_reply():
    pattern = r"<think>.+</think>\s*<answer>.+</answer>"
    completions = ["<think>4+3</think> <answer>7</answer>", "  <think>x\ny</think><answer>7</answer>\n",
                   "<answer>7</answer>", "<think>a</think><answer>7</answer> and more", ""]
    assert format([""] * 5, completions, pattern=pattern) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_overlong_is_dapos_soft_punishment():
    # max 10 tokens, buffer 4: free up to 6; 8 tokens are 2 into the buffer: (6 - 8) / 4 = -0.5; 11 are past it
    lengths = [0, 6, 7, 8, 10, 11]
    scores = overlong([""] * 6, [""] * 6, completion_ids=[[1] * n for n in lengths], max_tokens=10, buffer=4)
    assert scores == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError):
        overlong([""], [""], completion_ids=[[1]], max_tokens=10, buffer=0)


def test_function_scorers_get_the_columns_they_name_and_args_bound():
    right = build_scorer([ScorerConfig(kind="function", path=f"{VERIFIABLE}:accuracy")])
    scores = right(["q", "q"], ["7", "8"], answer=["7", "7"], source=["a", "b"], completion_ids=[[1], [2]])
    assert scores.tolist() == [1.0, 0.0]  # `source` and completion_ids: not its arguments, not passed
    long = build_scorer([ScorerConfig(kind="function", path=f"{VERIFIABLE}:overlong",
                                      args={"max_tokens": 2, "buffer": 1})])
    assert long(["q"] * 2, ["a", "b"], completion_ids=[[1, 2], [1, 2, 3]], answer=["x", "y"]).tolist() == [-1.0, -1.0]
    with pytest.raises(RlftError, match="scorer 'accuracy' needs the data column\\(s\\) answer, which 'p.jsonl' has "
                       "not \\(its other columns: source\\)"):
        require_columns(right, {"source": []}, "p.jsonl")
    require_columns(long, {}, "p.jsonl")  # completion_ids come from the sampler, not the data
    # a data column named like a bound argument never replaces it: max_tokens stays 2 (a list would raise)
    assert long(["q"], ["a"], completion_ids=[[1, 2]], max_tokens=[100]).tolist() == [-1.0]
    # a wrapper taking *args, **kwargs gets every column and completion_ids
    assert build_scorer([ScorerConfig(kind="function", path="tests.test_verifiable:wrapped")])(
        ["q", "q"], ["a", "b"], answer=["1", "0"], completion_ids=[[1], [2, 3]]).tolist() == [2.0, 2.0]
    with pytest.raises(RlftError, match="args \\['max_token'\\] do not fit"):
        build_scorer([ScorerConfig(kind="function", path=f"{VERIFIABLE}:overlong", args={"max_token": 2})])


def wrapped(*args, **kwargs):
    """A decorator's wrapper, no functools.wraps: (answer, with the reply's token count) by keyword."""
    return [float(a) + len(ids) for a, ids in zip(kwargs["answer"], kwargs["completion_ids"])]


def record(prompts, completions, answer, completion_ids, **_):
    """Scores each completion by its row's answer and remembers what it was given."""
    record.calls.append({"prompts": prompts, "answers": answer, "lengths": [len(ids) for ids in completion_ids],
                         "completions": completions})
    return [float(a) for a in answer]


record.calls = []


@pytest.fixture
def answered_prompts(tmp_path):
    path = tmp_path / "answered.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"say {i}"}], "answer": str(i)} for i in range(40)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_ppo_and_eval_score_each_completion_with_its_own_rows_answer(tiny_lm_dir, answered_prompts, tmp_path):
    record.calls.clear()
    config = load_config(PPOConfig, TINY, [
        f"output_dir={tmp_path / 'ppo'}", f"model.name_or_path={tiny_lm_dir}", f"data.path={answered_prompts}",
        "reward=[{kind: function, path: 'tests.test_verifiable:record'}]", "ppo.steps=1", "save_every=1",
        "ppo.missing_eos_penalty=0"])
    ppo = setup(config)
    assert ppo.columns == {"answer": [row_prompt[0]["content"].split()[1] for row_prompt in ppo.prompts]}
    from rlft.ppo.train import ppo_step
    metrics = ppo_step(ppo, 0)
    call = record.calls[-1]
    assert [p[0]["content"] for p in call["prompts"]] == [f"say {a}" for a in call["answers"]]  # row by row
    assert metrics["objective/scores"] == pytest.approx(sum(map(float, call["answers"])) / len(call["answers"]))
    assert all(0 < n <= config.sampling.max_new_tokens for n in call["lengths"])

    record.calls.clear()
    assert main(["eval", "--config", str(TINY.parent / "eval.yaml"), f"output_dir={tmp_path / 'eval'}",
                 f"policies=[{tmp_path / 'ppo' / 'checkpoints' / 'step-000001' / 'policy'}]",
                 f"data.path={answered_prompts}", "scorers=[{kind: function, path: 'tests.test_verifiable:record'}]",
                 "num_prompts=8"]) == 0
    for call in record.calls:  # the reference's pass and the policy's: each row scored by its own answer
        assert [p[0]["content"] for p in call["prompts"]] == [f"say {a}" for a in call["answers"]]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    scores = report["policies"][0]["rewards"]["record"]["policy"]
    answers = [float(a) for a in record.calls[-1]["answers"]]
    assert scores["n"] == len(answers) >= 4 and scores["mean"] == pytest.approx(sum(answers) / len(answers))


def test_a_scorer_needing_a_column_the_data_lacks_is_one_line_before_any_model(tiny_lm_dir, tmp_path, capsys):
    prompts = tmp_path / "plain.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}", "source": "x"}) + "\n" for i in range(8)))
    code = main(["ppo", "--config", str(TINY), f"output_dir={tmp_path / 'ppo'}", f"model.name_or_path={tiny_lm_dir}",
                 f"data.path={prompts}", f"reward=[{{kind: function, path: '{VERIFIABLE}:accuracy'}}]"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlft ppo: error: scorer 'accuracy' needs the data column(s) answer")
    assert not (tmp_path / "ppo").exists() or not any((tmp_path / "ppo").rglob("*.safetensors"))


def test_verifiable_functions_are_tensors_once_scored():
    scores = build_scorer([ScorerConfig(kind="function", path=f"{VERIFIABLE}:format", args={"pattern": "a+"})])(
        ["p", "p"], ["aaa", "ab"])
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 0.0]


def test_the_built_in_arithmetic_task_is_fixed_distinct_and_right():
    from rlft.data import load_any

    rows = load_any("arithmetic").to_list()
    assert len(rows) == 1400 and rows == load_any("arithmetic").to_list()  # the same on every call and machine
    questions = [row["prompt"][0]["content"] for row in rows]
    assert len(set(questions)) == len(rows)
    words = {"plus": "+", "minus": "-", "times": "*"}
    for question, row in zip(questions, rows):
        _, _, a, op, b = question.split("?")[0].split()
        assert int(row["answer"]) == eval(f"{a} {words[op]} {b}") >= 0  # noqa: S307 (digits and one operator)
    # the accuracy reward reads these answers: a right reply scores 1, the echoed question 0
    assert accuracy([rows[0]["prompt"]], [f"It is {rows[0]['answer']}."], answer=[rows[0]["answer"]]) == [1.0]
    assert accuracy([rows[0]["prompt"]], [questions[0]], answer=[rows[0]["answer"]]) == [0.0]
