"""`rlft eval`: the KL numbers by hand and on a tiny model, the report files, and bad input as one line."""

import json
import math
import shutil

import pytest
import torch

from rlft import cli
from rlft.config import LoraConfig, ModelConfig, load_config
from rlft.errors import RlftError
from rlft.evaluate import (
    EvalConfig,
    kl_drift,
    load_prompts,
    run,
    SamplePass,
    sequence_kl,
    summary,
    win_rate,
)
from rlft.generation import SamplingConfig, sample
from rlft.models import add_lora, load_model
from rlft.policy import load_policy, save_adapter

PROMPTS = ["hello how are you ?", "tell me a joke", "what is the sun ?", "i love my dog"]


# Function scorers the eval configs below point at ("tests.test_evaluate:words"), standing in for
# the reward model (proxy) and the sentiment judge (gold).
def words(prompts, completions):
    return [float(len(c.split())) for c in completions]


def happy(prompts, completions):
    return [float(sum(w in ("good", "great", "happy", "love") for w in c.split())) for c in completions]


def make_adapter(folder, base_dir, scale=0.0, seed=0, reference_adapter=None):
    """A LoRA adapter on the tiny model; scale 0 keeps peft's B = 0 init (policy == reference)."""
    model_config = ModelConfig(name_or_path=str(base_dir))
    torch.manual_seed(seed)
    model = add_lora(load_model(model_config, device="cpu"), model_config,
                     LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name and scale:
                parameter.normal_(0, scale)
    save_adapter(model, folder, model_config, reference_adapter)
    return folder


def write_prompts(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in prompts))
    return path


# --- numbers by hand -----------------------------------------------------------------------------


def test_sequence_kl_by_hand():
    # Vocabulary of 2; two responses laid end to end, of 1 and 2 tokens. pi = (1/2, 1/2) from logits (0, 0)
    # everywhere. Token 1 of each response: pi_ref = (1/4, 3/4) from logits (0, ln 3), and token 0 was
    # sampled, so k1 = ln(1/2) - ln(1/4) = ln 2 and the exact KL is
    # 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    # Token 2 of response 2: pi_ref = pi, so 0 both ways; each response sums to ln 2 and 1/2 ln(4/3).
    half, skewed = [0.0, 0.0], [0.0, math.log(3)]
    logits = torch.tensor([half, half, half])
    ref_logits = torch.tensor([skewed, skewed, half])
    sampled, exact, per_token, logprobs = sequence_kl(logits, ref_logits, torch.tensor([0, 0, 1]), [1, 2])
    torch.testing.assert_close(sampled, torch.tensor([math.log(2)] * 2))
    torch.testing.assert_close(exact, torch.tensor([0.5 * math.log(4 / 3)] * 2))
    torch.testing.assert_close(per_token, torch.tensor([0.5 * math.log(4 / 3)] * 2 + [0.0]))
    torch.testing.assert_close(logprobs, torch.tensor([math.log(0.5)] * 3))  # pi's, of each token


def test_summary_and_win_rate_by_hand():
    # values 1, 2, 3: mean 2, sample std 1, CI half width 1.96 / sqrt(3) = 1.1316
    stats = summary(torch.tensor([1.0, 2.0, 3.0]))
    assert stats["mean"] == pytest.approx(2.0) and stats["std"] == pytest.approx(1.0)
    assert stats["ci95"] == pytest.approx([2 - 1.96 / math.sqrt(3), 2 + 1.96 / math.sqrt(3)])
    # win, tie, loss, win: (1 + 0.5 + 0 + 1) / 4 = 0.625
    rate = win_rate(torch.tensor([2.0, 1.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, 4.0]))
    assert rate["mean"] == pytest.approx(0.625)


# --- KL on a tiny model --------------------------------------------------------------------------


def test_fresh_adapter_has_zero_kl_and_reference_samples(tiny_lm_dir, tmp_path):
    # LoRA B = 0: the policy is its reference, so KL is exactly 0 both ways, and the same seed gives
    # the reference pass the same samples.
    model, tokenizer, _ = load_policy(make_adapter(tmp_path / "fresh", tiny_lm_dir))
    model.eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=8)
    torch.manual_seed(0)
    policy = SamplePass(sample(model, tokenizer, texts, sampling, batch_size=3))
    kl = kl_drift(model, policy, sampling, tokenizer.eos_token_id, batch_size=3)
    assert torch.equal(kl["sampled"], torch.zeros(len(PROMPTS)))
    assert torch.equal(kl["exact"], torch.zeros(len(PROMPTS)))
    assert len(kl["per_token"]) == len(PROMPTS) and all(v == 0 for row in kl["per_token"] for v in row)
    with model.disable_adapter():
        torch.manual_seed(0)
        reference = SamplePass(sample(model, tokenizer, texts, sampling, batch_size=3))
    assert reference.completions == policy.completions



def test_under_a_length_floor_eval_measures_the_distributions_sampled(tiny_lm_dir, tmp_path):
    """sampling.min_new_tokens bans EOS for a reply's first tokens: eval's log-probs and KL are then those of
    policy and reference with EOS banned at the same positions (as PPO's are), by hand on one reply."""
    model, tokenizer, _ = load_policy(make_adapter(tmp_path / "moved", tiny_lm_dir, scale=0.3, seed=1))
    model.eval()
    eos, floor = tokenizer.eos_token_id, 3
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=8, min_new_tokens=floor)
    torch.manual_seed(0)
    policy = SamplePass(sample(model, tokenizer, texts, sampling, batch_size=4))
    kl = kl_drift(model, policy, sampling, eos, batch_size=4)
    # the sampler drew from the banned distribution; recomputed without the ban, each of the first tokens
    # would be off by -log(1 - p(EOS)), about 1e-2 on this model
    assert kl["sampler_gap"]["max"] < 1e-5

    batch = policy.batches[0]
    prompt = batch.query["input_ids"][0][batch.query["attention_mask"][0].bool()]
    response = batch.ids[0][batch.mask[0]]
    assert len(response) > floor
    ids = torch.cat([prompt, response])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        with model.disable_adapter():
            ref_logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    logits[:floor, eos] = ref_logits[:floor, eos] = float("-inf")
    p, q = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    by_hand = (p.exp() * (p - q).nan_to_num(0.0)).sum(-1)  # 0 * (-inf - -inf) at EOS counts 0
    torch.testing.assert_close(torch.tensor(kl["per_token"][0]), by_hand, atol=1e-5, rtol=1e-4)

def test_sampled_kl_agrees_with_exact_in_expectation(tiny_lm_dir, tmp_path):
    # E_y~pi[sum_t k1_t] = E_y~pi[sum_t exact_t] = KL(pi || pi_ref) of whole responses. Compare the
    # per-response difference (paired, so its variance is small) against its standard error.
    model, tokenizer, _ = load_policy(make_adapter(tmp_path / "moved", tiny_lm_dir, scale=0.3, seed=1))
    model.eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS] * 50
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.8)  # logprobs must use the sampler's temperature
    torch.manual_seed(0)
    rollout = SamplePass(sample(model, tokenizer, texts, sampling, batch_size=100))
    kl = kl_drift(model, rollout, sampling, tokenizer.eos_token_id, batch_size=200)
    difference = kl["sampled"] - kl["exact"]
    standard_error = difference.std() / math.sqrt(len(difference))
    assert kl["exact"].mean() > 0.2  # clearly moved
    assert abs(difference.mean()) < 4 * standard_error, (kl["exact"].mean(), kl["sampled"].mean(), standard_error)
    # how rows are batched (and so padded) for the forward passes does not change a response's KL
    rebatched = kl_drift(model, rollout, sampling, tokenizer.eos_token_id, batch_size=37)
    torch.testing.assert_close(rebatched["exact"], kl["exact"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rebatched["sampled"], kl["sampled"], atol=1e-4, rtol=1e-4)


# --- the stage, end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs_dir(tiny_lm_dir, tmp_path_factory):
    """An SFT dir and a fake PPO run (final policy, two checkpoints, metrics.jsonl cut mid-line)."""
    root = tmp_path_factory.mktemp("runs")
    sft = make_adapter(root / "sft", tiny_lm_dir, scale=0.1, seed=1)
    ppo = root / "ppo"
    for step, scale in ((10, 0.15), (20, 0.3)):
        make_adapter(ppo / "checkpoints" / f"step-{step:06d}" / "policy", tiny_lm_dir, scale, step, str(sft))
    make_adapter(ppo / "policy", tiny_lm_dir, 0.3, 20, str(sft))  # the result: step 20's weights, saved as PPO does
    lines = [json.dumps({"step": s, "objective/scores": 0.1 * s, "objective/kl": 0.05 * s,
                         "objective/kl_coef": 0.05, "loss/policy": -0.01, "loss/value": 1.0 / s,
                         "response/length": 5.0}) for s in range(1, 21)]
    (ppo / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "objective/sco')
    write_prompts(root / "prompts.jsonl")
    (root / "no_prompts.csv").write_text("prompt\n")
    return root


def eval_yaml(root, name="eval.yaml", **extra):
    config = {
        "policies": [str(root / "sft"), str(root / "ppo")],
        "checkpoints_of": str(root / "ppo"),
        "output_dir": str(root / "eval"),
        "num_prompts": 4, "num_samples_shown": 2, "batch_size": 4,
        "data": {"path": str(root / "prompts.jsonl"), "eval_split": "train"},
        "sampling": {"max_new_tokens": 6},
        "scorers": [{"kind": "function", "path": "tests.test_evaluate:words"},
                    {"kind": "function", "path": "tests.test_evaluate:happy"}],
        "gold": "happy",
        **extra,
    }
    path = root / name
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


def test_cli_writes_report(runs_dir):
    assert cli.main(["eval", "--config", eval_yaml(runs_dir)]) == 0
    out = runs_dir / "eval"
    report = json.loads((out / "report.json").read_text())
    assert [p["label"] for p in report["policies"] + report["checkpoints"]] == ["sft", "ppo", "step 10", "step 20"]
    assert (report["proxy"], report["gold"]) == ("words", "happy")
    assert len(report["training"]["rows"]) == 20  # the cut last line is skipped
    assert report["training"]["run"] == str(runs_dir / "ppo")  # the PPO run among the policies
    sft, ppo = report["policies"]
    assert sft["kl"]["exact"]["mean"] > 0 and ppo["kl"]["exact"]["mean"] > 0
    # sampled from the very policy measured (float32): the sampler's log-probs are the recomputed ones
    assert all(p["sampler"]["logprob_gap_max"] < 1e-4 for p in report["policies"] + report["checkpoints"])
    assert set(sft["rewards"]) == {"words", "happy"}
    assert len(sft["samples"]) == 2 and len(sft["per_prompt"]["kl_exact"]) == 4
    # the final policy is checkpoint 20's weights with the same reference: same samples, same numbers
    assert ppo["per_prompt"] == report["checkpoints"][1]["per_prompt"]
    for name in ("rewards", "kl", "training", "overoptimization"):
        assert (out / report["files"][name]).is_file()
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 4
    markdown = (out / "report.md").read_text()
    assert "| Policy | Scorer |" in markdown and "![" in markdown and "## Over-optimisation" in markdown
    # the hacking section (the detectors' numbers are checked by hand in test_hacking.py)
    hacking = sft["hacking"]
    assert set(hacking["length_correlation"]) == {"words", "happy"}
    assert hacking["length_shift"] == pytest.approx(sft["response"]["policy"]["length"]["mean"]
                                                    - sft["response"]["reference"]["length"]["mean"])
    assert set(hacking["diversity"]["policy"]) == {"distinct_1", "distinct_2", "self_bleu"}
    assert 0 <= hacking["disagreement_rate"] <= 1
    assert report["recommended"]["step"] in (0, 10, 20)
    assert "## Reward hacking" in markdown and "Recommended checkpoint: step" in markdown
    assert "<h2>Reward hacking</h2>" in page


def test_each_policy_and_reference_is_sampled_once_however_its_folder_is_named(runs_dir, tmp_path, monkeypatch):
    """The final policy is checkpoint 20's weights, and every checkpoint shares the SFT model as reference: named
    relative to the working folder in `policies` and absolute in `checkpoints_of` (as a user may), they are still
    sampled once each. sft, step 10, step 20 (= ppo) and two references (the base, the SFT model): five passes."""
    import rlft.evaluate

    calls = []
    real = rlft.evaluate.sample
    monkeypatch.setattr(rlft.evaluate, "sample", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    monkeypatch.chdir(runs_dir)
    assert cli.main(["eval", "--config", eval_yaml(runs_dir, "relative.yaml", policies=["sft", "ppo"],
                                                   output_dir=str(tmp_path / "eval"))]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [p["label"] for p in report["policies"] + report["checkpoints"]] == ["sft", "ppo", "step 10", "step 20"]
    assert len(calls) == 5


def test_checkpoints_on_fewer_prompts_each_against_its_reference_on_the_same_prompts(runs_dir, tmp_path, monkeypatch):
    """checkpoint_prompts=2 of 4: the checkpoints and their reference sample the first 2 prompts, the policies all
    4; step 20 has the final policy's weights but is measured again on the checkpoints' 2, so the curve's points
    compare. Seven passes: sft, the base, ppo, the SFT model on 4 prompts; step 10, the SFT model, step 20 on 2."""
    import rlft.evaluate

    sampled = []
    real = rlft.evaluate.sample
    monkeypatch.setattr(rlft.evaluate, "sample", lambda model, tokenizer, texts, *args, **kwargs:
                        sampled.append(texts) or real(model, tokenizer, texts, *args, **kwargs))
    assert cli.main(["eval", "--config", eval_yaml(runs_dir, "few.yaml", output_dir=str(tmp_path / "eval"),
                                                   checkpoint_prompts=2, num_samples_shown=4)]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["prompts"] == {"source": str(runs_dir / "prompts.jsonl"), "count": 4, "checkpoints": 2}
    assert [len(texts) for texts in sampled] == [4, 4, 4, 4, 2, 2, 2]
    assert sampled[4] == sampled[0][:2]  # the first prompts, in order
    sft, ppo = report["policies"]
    step10, step20 = report["checkpoints"]
    assert (sft["prompts"], ppo["prompts"], step10["prompts"], step20["prompts"]) == (4, 4, 2, 2)
    for step in (step10, step20):
        assert len(step["per_prompt"]["kl_exact"]) == 2 and len(step["samples"]) == 2
        assert [s["prompt"] for s in step["samples"]] == [s["prompt"] for s in sft["samples"][:2]]
    assert "evaluated on the first 2 of these prompts" in (tmp_path / "eval" / "report.md").read_text()


def test_collapse_leads_the_report_and_the_recommendation_says_how_it_stands_to_ppos_choice(runs_dir, tmp_path, capsys):
    """A policy whose replies collapsed is the report's first section; a collapsed checkpoint is never
    recommended; and the recommendation says how it stands to the checkpoint the PPO run kept, and why."""
    from rlft.hacking import COLLAPSE_LIMITS, overoptimization_points, recommend
    from rlft.report import write_report

    (runs_dir / "ppo" / "metrics.json").write_text(json.dumps({"result_step": 20, "result_kl": 1.5, "kl_budget": 9.0}))
    try:
        assert cli.main(["eval", "--config", eval_yaml(runs_dir, "kept.yaml", output_dir=str(tmp_path / "kept"))]) == 0, \
            capsys.readouterr().err[-500:]
    finally:
        (runs_dir / "ppo" / "metrics.json").unlink()
    report = json.loads((tmp_path / "kept" / "report.json").read_text())
    # a run from before collapse_signals existed judged by every signal
    assert report["training_result"] == {"result_step": 20, "result_kl": 1.5, "kl_budget": 9.0, "result_scale": 1.0,
                                         "collapse_signals": list(COLLAPSE_LIMITS)}
    assert report["kl_budget"] == 9.0  # no budget of its own: PPO's
    # step 20 (and the final policy, the same weights) collapsed: the report says so first, and step 10 wins
    for result in [report["policies"][1], report["checkpoints"][1]]:
        result["hacking"]["collapse"]["warnings"] = ["one reply is 90% of the samples ('Yes.')"]
    report["recommended"] = recommend(overoptimization_points(report), report["kl_budget"], by="gold")
    assert report["recommended"]["step"] in (0, 10)
    (tmp_path / "rendered").mkdir()
    write_report(report, tmp_path / "rendered")
    markdown = (tmp_path / "rendered" / "report.md").read_text()
    sections = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Warnings" and "one reply is 90% of the samples" in markdown
    assert "The PPO run kept step 20 as its result (KL 1.50 by its own measurement, budget 9); this report differs " \
           "because its replies collapsed." in markdown
    # a result PPO scaled onto its KL target is not any checkpoint here, which the recommendation says
    from rlft.report import recommendation

    report["training_result"]["result_scale"] = 1.26
    report["recommended"] = {**next(p for p in overoptimization_points(report) if p["step"] == 20), "by": "gold"}
    assert recommendation(report).endswith(
        "The PPO run kept step 20 with its update scaled by 1.26 to land its KL on the target (KL 1.50 by its own "
        "measurement, budget 9); the checkpoints here are unscaled.")


def test_a_model_that_ignores_the_cache_stops_eval(runs_dir, tmp_path, capsys, monkeypatch):
    """Samples from a model that ignores the KV cache argument are not the policy's: their log-probs disagree
    with kl_drift's recomputed ones, and eval stops in one line naming the policy and the model."""
    from tests.test_ppo import ignore_the_cache

    ignore_the_cache(monkeypatch)
    config = eval_yaml(runs_dir, "forgetful.yaml", output_dir=str(tmp_path / "eval"), checkpoints_of="",
                       policies=[str(runs_dir / "sft")])
    assert cli.main(["eval", "--config", config]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "sft: the sampler's log-probs of its own tokens differ from the recomputed ones" in line
    assert str(json.loads((runs_dir / "sft" / "rlft_adapter.json").read_text())["base_model"]["name_or_path"]) in line
    assert "max_sampler_gap" in line


def test_prompts_past_the_context_are_one_line_before_any_weights_load(runs_dir, tmp_path, capsys, monkeypatch):
    from rlft import evaluate

    monkeypatch.setattr(evaluate, "load_policy", lambda *args, **kwargs: pytest.fail("eval loaded weights"))
    long = write_prompts(tmp_path / "long.jsonl", ["hello " * 252])  # 256 positions in the tiny model
    config = eval_yaml(runs_dir, "long.yaml", output_dir=str(tmp_path / "eval"), checkpoints_of="",
                       data={"path": str(long), "eval_split": "train"},
                       sampling={"max_new_tokens": 6, "max_prompt_length": 300})
    assert cli.main(["eval", "--config", config]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("rlft eval: error: 1 of 1 prompts (longest") and "model's context (256 tokens)" in line


def test_same_seed_same_numbers(runs_dir):
    config = load_config(EvalConfig, eval_yaml(runs_dir, "again.yaml", output_dir=str(runs_dir / "again")))
    config.checkpoints_of, config.policies = "", config.policies[1:]
    first, second = run(config)["policies"][0], run(config)["policies"][0]
    assert first["per_prompt"] == second["per_prompt"] and first["samples"] == second["samples"]


def test_other_base_model_is_refused(runs_dir, tiny_lm_dir, tmp_path):
    other_base = shutil.copytree(tiny_lm_dir, tmp_path / "other_base")
    other = make_adapter(tmp_path / "other", other_base, scale=0.1)
    config = load_config(EvalConfig, eval_yaml(runs_dir), [f"policies=[{other}]"])
    with pytest.raises(RlftError, match="base model"):
        run(config)


@pytest.mark.parametrize("override, message", [
    ("policies=[/nonexistent/sft]", "not found"),
    ("checkpoints_of=/nonexistent/ppo", "not found"),
    ("training_run=/nonexistent/ppo", "metrics.jsonl"),
    ("data.path={root}/no_prompts.csv", "no data"),  # a header and no rows
    ("policies=[{root}]", "not an rlft adapter"),
    ("gold=nope", "gold"),
])
def test_bad_input_is_one_line(runs_dir, capsys, override, message):
    assert cli.main(["eval", "--config", eval_yaml(runs_dir), override.format(root=runs_dir)]) == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]  # after any datasets progress bar
    assert error.startswith("rlft eval: error:") and message in error and "Traceback" not in stderr, error


def test_shipped_config_loads():
    config = load_config(EvalConfig, "configs/eval.yaml")
    assert config.policies == ["runs/sft", "runs/ppo"] and config.checkpoints_of == "runs/ppo"
    assert [s.name for s in config.scorers] == ["proxy", "gold"] and config.gold_scorer == "gold"
    assert config.scorers[0].normalize and config.scorers[1].path == "reward_models.judges:sentiment"


def test_held_out_prompts_count_once(tmp_path):
    """A prompt with several replies is one held-out prompt: evaluated once, never on a trained prompt."""
    from rlft.config import DataConfig
    from rlft.data import load_splits

    path = tmp_path / "replies.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}],
                                        "completion": [{"role": "assistant", "content": f"a{j}"}]}) + "\n"
                            for i in range(20) for j in range(3)))
    data = DataConfig(path=str(path), eval_fraction=0.25)
    prompts, columns = load_prompts(EvalConfig(data=data, num_prompts=100))
    assert columns == {}  # prompt and completion only: no other column
    assert len(prompts) == len({p[0]["content"] for p in prompts}) == 5
    train, _, _ = load_splits(data, ("prompt_completion",))
    assert not {p[0]["content"] for p in prompts} & {p[0]["content"] for p in train["prompt"]}
