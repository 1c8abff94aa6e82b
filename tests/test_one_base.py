"""Four roles on one base: the reward model and the critic as adapters beside the policy's (issue 13).

policy = base + "default", reference = all adapters off, reward model = base + "reward" + its score head,
critic = base + "critic" + a value head. Exactness, storage, lineage, resume and learning (on a 4-bit base).
"""

import json
from pathlib import Path

import pytest
import torch

from rlft.cli import main
from rlft.config import LoraConfig, ModelConfig, load_config
from rlft.ppo.config import PPOConfig
from tests.test_ppo import TARGET, TINY, history
from tests.test_reward import tiny_config, write_marker_pairs


def lora_with_random_b(model, seed: int):
    """Move every lora_B off zero, so an adapter actually changes the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


@pytest.fixture(scope="module")
def sft_dir(tiny_lm_dir, tmp_path_factory):
    """An SFT adapter on the tiny Llama (random, not trained: only its weights matter here)."""
    from rlft.models import add_lora, load_model
    from rlft.policy import save_adapter

    folder = tmp_path_factory.mktemp("sft")
    model_config = ModelConfig(name_or_path=str(tiny_lm_dir))
    model = lora_with_random_b(add_lora(load_model(model_config), model_config, LoraConfig(r=4, alpha=8)), seed=1)
    save_adapter(model, folder, model_config, reference_adapter=None)
    return folder


def train_reward_adapter(base_dir, out, *overrides):
    from reward_models.train import run

    pairs = write_marker_pairs(out.parent / f"{out.name}_pairs.jsonl", 64)
    return run(tiny_config(base_dir, pairs, out, "lora_enabled=true", "lora.r=4", "train.epochs=6",
                           "train.learning_rate=1e-2", *overrides))


@pytest.fixture(scope="module")
def reward_dir(tiny_lm_dir, sft_dir, tmp_path_factory):
    """A reward adapter + score head on the SFT model (the tiny Llama with sft_dir merged)."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    metrics = train_reward_adapter(tiny_lm_dir, out, f"sft_adapter={sft_dir}")
    # Not "after > before": on some CPUs the random score head already ranks these marker pairs (seen: 1.0 before
    # training on AVX-512). Learning is test_reward's; here the adapter must rank them well.
    assert metrics["eval_accuracy_after"] >= 0.9, metrics
    return out


PROMPTS = [[{"role": "user", "content": "hello how are you"}], [{"role": "user", "content": "tell me a joke"}]] * 3
COMPLETIONS = ["i am good", "no", "the cat is very happy today", "sad great", "yes yes yes", ""]


def policy_on_sft(tiny_lm_dir, sft_dir):
    from rlft.models import add_lora
    from rlft.policy import load_reference

    model_config = ModelConfig(name_or_path=str(tiny_lm_dir))
    base = load_reference(model_config, str(sft_dir))
    policy = lora_with_random_b(add_lora(base, model_config, LoraConfig(r=4, alpha=8, dropout=0.0)), seed=2)
    return policy.eval(), model_config


def test_reward_adapter_records_the_sft_model_it_was_trained_on(reward_dir, sft_dir):
    info = json.loads((reward_dir / "rlft_adapter.json").read_text())
    assert info["reference_adapter"] == str(sft_dir)
    assert json.loads((reward_dir / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_scores_on_the_shared_base_equal_the_standalone_model_and_leave_log_probs_alone(
        tiny_lm_dir, sft_dir, reward_dir):
    from reward_models.scorers import AdapterScorer, ScorerConfig, build_scorer
    from rlft.ppo.model import PolicyWithValueHead

    policy, model_config = policy_on_sft(tiny_lm_dir, sft_dir)
    ids = torch.tensor([[4, 5, 6, 7, 8, 9, 10, 11], [0, 0, 12, 13, 14, 15, 16, 3]])
    mask = (ids != 0).long()

    def log_probs():
        actor = PolicyWithValueHead(policy, critic=None)
        with torch.no_grad():
            return actor(ids, mask, 4, 1.0)[0], actor.reference_logprobs(ids, mask, 4, 1.0)[0]

    before, reference_before = log_probs()
    config = ScorerConfig(kind="adapter", path=str(reward_dir), normalize=True)
    shared = AdapterScorer(config)
    shared.check_base(model_config, str(sft_dir))
    shared.attach(policy)
    scores = shared(PROMPTS, COMPLETIONS)
    after, reference_after = log_probs()
    # Scoring switched adapters and back: the policy and its reference are bit-for-bit what they were.
    assert torch.equal(before, after) and torch.equal(reference_before, reference_after)
    assert policy.active_adapter == "default"
    assert not any(p.requires_grad for n, p in policy.named_parameters() if f".{shared.adapter}." in n)

    # The same adapter on its own base copy: plain peft on a sequence classifier of the SFT model
    standalone = build_scorer([config])  # outside PPO, kind adapter loads standalone
    assert type(standalone).__name__ == "ModelScorer"
    torch.testing.assert_close(scores, standalone(PROMPTS, COMPLETIONS), atol=1e-5, rtol=1e-5)
    assert scores.std() > 0.1  # not a constant head


def test_four_roles_hold_one_copy_of_the_base(tiny_lm_dir, sft_dir, reward_dir, data, tmp_path):
    """What `rlft ppo` builds (rlft.ppo.train.build_actor_critic) with a reward adapter and an adapter critic."""
    from reward_models.scorers import adapter_scorers, build_scorer
    from rlft.models import load_tokenizer
    from rlft.ppo.train import build_actor_critic

    config = one_base_config(tiny_lm_dir, data / "prompts.jsonl", reward_dir, tmp_path, f"sft_adapter={sft_dir}")
    scorer = build_scorer(config.reward, "cpu", shared_base=True)
    actor_critic = build_actor_critic(config, load_tokenizer(config.model), scorer, "cpu")
    reward = adapter_scorers(scorer)[0]
    named = dict(actor_critic.policy.named_parameters())
    base_bytes = sum(p.numel() * p.element_size() for n, p in named.items() if "lora_" not in n)
    adapters = sum(p.numel() * p.element_size() for n, p in named.items() if "lora_" in n)  # policy, reward, critic
    assert any(f".{reward.adapter}." in n for n in named) and any(".critic." in n for n in named)
    storage = {}
    for tensor in [*actor_critic.parameters(), *actor_critic.buffers(), *reward.model.parameters()]:
        storage[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    heads = sum(p.numel() * p.element_size() for p in [*actor_critic.value_head.parameters(), *reward.model.score.parameters()])
    # base once, the three adapters, two 1-row heads, rotary buffers
    assert sum(storage.values()) < base_bytes + adapters + heads + 4096
    assert base_bytes > 20 * 4096  # so a second copy of the base could not hide in the slack


def test_the_adapter_critic_starts_as_the_normalised_reward_model(tiny_lm_dir, sft_dir, reward_dir):
    """value(state before token t) == normalised reward of the text up to that state, for an unpadded row."""
    from reward_models.scorers import AdapterScorer, ScorerConfig, score_ids
    from rlft.ppo.model import PolicyWithValueHead

    policy, _ = policy_on_sft(tiny_lm_dir, sft_dir)
    scorer = AdapterScorer(ScorerConfig(kind="adapter", path=str(reward_dir), normalize=True))
    scorer.attach(policy)
    actor_critic = PolicyWithValueHead(policy, critic="adapter", critic_from=scorer)
    ids = torch.tensor([[2, 6, 7, 8, 3, 2, 9, 10, 11, 12]])
    with torch.no_grad():
        _, values, _ = actor_critic(ids, torch.ones_like(ids), 4, 1.0)
    from rlft.policy import active_adapter

    with active_adapter(policy, scorer.adapter):
        prefixes = [ids[0, : 6 + t].tolist() for t in range(4)]  # the state before response token t
        rewards = score_ids(scorer.model, prefixes, pad_token_id=0, batch_size=1)
    torch.testing.assert_close(values[0], (rewards - scorer.mean) / scorer.std, atol=1e-5, rtol=1e-5)
    assert rewards.std() > 0


def one_base_config(base_dir, prompts_file, reward, out, *overrides):
    return load_config(PPOConfig, TINY, [
        f"output_dir={out}", f"model.name_or_path={base_dir}", f"data.path={prompts_file}",
        f"reward=[{{kind: adapter, path: '{reward}', normalize: true}}]", "ppo.critic=adapter",
        "lora.r=8", "lora.alpha=16", "sampling.max_new_tokens=8", "ppo.rollout_batch_size=16",
        "ppo.mini_batch_size=8", "ppo.steps=4", "ppo.kl_control=fixed", "ppo.kl_coef=0.01",
        "ppo.missing_eos_penalty=0", "save_every=2", *overrides,
    ])


def test_ppo_refuses_a_reward_adapter_trained_on_other_weights(tiny_lm_dir, reward_dir, data, tmp_path, capsys):
    # reward_dir sits on the SFT model; this PPO runs on the raw base
    assert main(["ppo", "--config", str(TINY), f"model.name_or_path={tiny_lm_dir}", f"data.path={data / 'prompts.jsonl'}",
                 f"reward=[{{kind: adapter, path: '{reward_dir}'}}]", f"output_dir={tmp_path / 'ppo'}"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was trained on" in line and "SFT adapter" in line and "kind: model" in line
    assert not (tmp_path / "ppo" / "checkpoints").exists()


def test_resume_with_reward_and_critic_adapters_matches_uninterrupted_run(tiny_lm_dir, sft_dir, reward_dir, data,
                                                                          tmp_path):
    from rlft import evaluate
    from rlft.ppo.train import run

    prompts = data / "prompts.jsonl"
    common = (f"sft_adapter={sft_dir}",)
    run(one_base_config(tiny_lm_dir, prompts, reward_dir, tmp_path / "straight", *common))
    run(one_base_config(tiny_lm_dir, prompts, reward_dir, tmp_path / "resumed", *common, "ppo.steps=2"))
    assert (tmp_path / "resumed" / "checkpoints" / "step-000002" / "critic" / "adapter_model.safetensors").is_file()
    run(one_base_config(tiny_lm_dir, prompts, reward_dir, tmp_path / "resumed", *common))
    straight, resumed = history(tmp_path / "straight"), history(tmp_path / "resumed")
    assert straight[0]["objective/kl"] == 0.0
    for a, b in zip(straight, resumed):
        for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "val/explained_variance"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert "val/grad_norm" in straight[0]  # the critic is its own parameter group

    # rlft eval takes the same reward adapter as a scorer (on its own copy of the base)
    report_config = load_config(evaluate.EvalConfig, None, [
        f"policies=[{tmp_path / 'straight'}]", f"output_dir={tmp_path / 'eval'}", "num_prompts=4", "batch_size=4",
        f"data.path={prompts}", "data.eval_split=train", "sampling.max_new_tokens=6", "checkpoints_of=",
        f"scorers=[{{name: proxy, kind: adapter, path: '{reward_dir}', normalize: true}}, "
        "{name: gold, kind: function, path: 'tests.test_ppo:share_of_target'}]", "gold=gold"])
    evaluate.run(report_config)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["proxy"] == "proxy"


@pytest.mark.parametrize("base", [["model.quantization=4bit"], ["model.quantization=4bit", "model.dtype=bfloat16"],
                                  ["model.dtype=bfloat16"]], ids=["4bit", "4bit-bf16-compute", "bfloat16"])
def test_all_four_roles_on_a_4bit_or_bf16_base_learn_a_toy_task(base, tiny_lm_dir_64, data, tmp_path):
    """Reward adapter trained on a 4-bit (or bf16) base (chosen replies contain the target word), then PPO on that
    base with the reward adapter scoring and an adapter critic: the reward model's score and the target word rise."""
    from rlft.ppo.train import run

    metrics = train_reward_adapter(tiny_lm_dir_64, tmp_path / "rm", *base)
    assert metrics["eval_accuracy_after"] >= 0.75
    run(one_base_config(tiny_lm_dir_64, data / "prompts.jsonl", tmp_path / "rm", tmp_path / "ppo",
                        *base, "sft_adapter=", "ppo.steps=40", "save_every=100", "sample_every=1"))
    scores = [entry["objective/scores"] for entry in history(tmp_path / "ppo")]
    assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4 + 0.5, scores
    samples = [json.loads(line) for line in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]

    def target_share(rows):
        return sum(r["completion"].split().count(TARGET) for r in rows) / max(sum(len(r["completion"].split()) for r in rows), 1)

    first, last = [r for r in samples if r["step"] <= 4], [r for r in samples if r["step"] > 32]
    assert target_share(last) > target_share(first) + 0.1, (target_share(first), target_share(last))


def test_two_reward_adapters_in_a_weighted_sum_each_get_their_own_adapter(tiny_lm_dir, sft_dir, reward_dir):
    from reward_models.scorers import AdapterScorer, ScorerConfig, adapter_scorers, build_scorer

    policy, _ = policy_on_sft(tiny_lm_dir, sft_dir)
    single = AdapterScorer(ScorerConfig(name="one", kind="adapter", path=str(reward_dir)))
    summed = build_scorer([ScorerConfig(name="a", kind="adapter", path=str(reward_dir), weight=1.0),
                           ScorerConfig(name="b.v2", kind="adapter", path=str(reward_dir), weight=0.5)], shared_base=True)
    for scorer in [single, *adapter_scorers(summed)]:
        scorer.attach(policy)
    assert {"reward_one", "reward_a", "reward_b_v2"} <= set(policy.peft_config)
    torch.testing.assert_close(summed(PROMPTS, COMPLETIONS), 1.5 * single(PROMPTS, COMPLETIONS), atol=1e-5, rtol=1e-5)
