"""The models users bring: tiny random causal LMs of many families, built in-process, each through
sft -> ppo (KL exactly 0 at step 1) -> eval; causal-LM reward backbones; a tokenizer without a chat template."""

import json
from pathlib import Path

import pytest
import torch

from rlft.config import load_config
from rlft.evaluate import EvalConfig
from rlft.evaluate import run as run_eval
from rlft.ppo.config import PPOConfig
from rlft.ppo.train import run as run_ppo
from rlft.sft import SFTConfig
from rlft.sft import run as run_sft
from tests import tiny

SCORER = "[{name: target, kind: function, path: 'tests.test_ppo:share_of_target'}]"
WORDS = "hello how are you tell me about the cat dog sun rain day night".split()

# family: (config class, its arguments at tiny size, the family's natural LoRA target names)
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128), ["q_proj", "v_proj"]),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128), ["c_attn", "c_proj"]),
    # word_embed_proj_dim != hidden_size: the LM head reads a 16-wide projection, as in OPT-350m
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=16), ["q_proj", "v_proj"]),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4), ["query_key_value"]),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=128), ["query_key_value"]),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128), ["q_proj", "k_proj", "v_proj"]),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128, head_dim=8), ["q_proj", "v_proj"]),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128), ["q_proj", "o_proj"]),
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=128),
             ["qkv_proj", "o_proj"]),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128),
               ["query_key_value"]),
    "mixtral": ("MixtralConfig", dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4,
                                      num_experts_per_tok=2, head_dim=8), ["q_proj", "v_proj"]),
    # MoE routers that are nn.Linear subclasses returning (scores, logits): all-linear must leave them alone
    "llama4_text": ("Llama4TextConfig", dict(hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                                             max_position_embeddings=128, moe_layers=[0, 1]), ["q_proj", "v_proj"]),
    "phimoe": ("PhimoeConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                                    max_position_embeddings=128), ["q_proj", "v_proj"]),
    # fused experts (3-D weights): all-linear adapts them as parameters, which take no LoRA dropout
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=128),
                  ["q_proj", "v_proj"]),
    "gemma3n": ("Gemma3nTextConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                          hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2,
                                          num_kv_shared_layers=0, layer_types=["sliding_attention", "full_attention"],
                                          sliding_window=4, activation_sparsity_pattern=[0.0, 0.0]),
                ["q_proj", "v_proj"]),
    # state-space blocks: peft refuses out_proj/conv1d there; Mamba-1 decodes with no mask past the prefill
    "mamba": ("MambaConfig", dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4),
              ["in_proj", "x_proj"]),
    "mamba2": ("Mamba2Config", dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                                    num_heads=8, head_dim=8, n_groups=1), ["in_proj"]),
    "falcon_h1": ("FalconH1Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4,
                                         mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, max_position_embeddings=128),
                  ["q_proj", "v_proj"]),
}


# MoE families whose experts are 3-D tensors, not nn.Linear: all-linear adapts them as parameters (dropout 0)
FUSED_EXPERTS = {"mixtral", "llama4_text", "phimoe", "qwen3_moe"}


def adapted(adapter: Path) -> set[str]:
    """The saved adapter's weight names, e.g. model.layers.0.mlp.experts.lora_A.weight."""
    from safetensors.torch import load_file

    return set(load_file(adapter / "adapter_model.safetensors"))


def save_family(folder: Path, family: str, chat_template: bool = True) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, arguments, _ = FAMILIES[family]
    tokenizer = tiny.build_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id, initializer_range=0.2, **arguments)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family_data")
    rows = [("hello how are you ?", "i am good , thanks !"), ("tell me a joke", "why the cat ? because the dog !")] * 8
    (folder / "sft.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}) + "\n"
        for p, c in rows))
    prompts = [{"prompt": [{"role": "user", "content": " ".join(WORDS[i % 7: i % 7 + 3])}]} for i in range(24)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
    return folder


def through_every_stage(model_dir: Path, files: Path, out: Path, targets: list[str], *model_overrides):
    """sft with the family's own target names, ppo from it with all-linear, eval of both; the PPO history."""
    sft_out, ppo_out = out / "sft", out / "ppo"
    run_sft(load_config(SFTConfig, None, [
        f"output_dir={sft_out}", f"model.name_or_path={model_dir}", f"data.path={files / 'sft.jsonl'}",
        f"lora.target_modules={json.dumps(targets)}", "lora.r=4", "train.max_steps=2", "train.batch_size=4",
        "num_samples=1", *model_overrides]))
    run_ppo(load_config(PPOConfig, None, [
        f"output_dir={ppo_out}", f"model.name_or_path={model_dir}", f"sft_adapter={sft_out}",
        f"data.path={files / 'prompts.jsonl'}", f"reward={SCORER}", "lora.r=4", "lora.dropout=0",
        "sampling.max_new_tokens=6", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.steps=2",
        "ppo.learning_rate=1e-2", *model_overrides]))
    report = run_eval(load_config(EvalConfig, None, [
        f"policies=[{sft_out},{ppo_out}]", f"data.path={files / 'prompts.jsonl'}", "num_prompts=4",
        "sampling.max_new_tokens=6", f"output_dir={out / 'eval'}", f"scorers={SCORER}"]))
    history = [json.loads(line) for line in (ppo_out / "metrics.jsonl").read_text().splitlines()]
    return history, report


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_through_sft_ppo_and_eval(family, files, tmp_path):
    """SFT with the family's own layer names, PPO (all-linear) from it, eval of both; and the rollouts were
    sampled from the very distribution PPO recomputes (float32: the sampler's log-probs equal the trainer's)."""
    model_dir = save_family(tmp_path / "model", family)
    history, report = through_every_stage(model_dir, files, tmp_path, FAMILIES[family][2])
    assert history[0]["objective/kl"] == 0.0  # the reference is the SFT model: exactly, at step 1
    assert history[1]["objective/kl"] != 0.0  # and the policy did move
    assert all(entry["sampler/logprob_gap_max"] < 1e-3 for entry in history), [e["sampler/logprob_gap_max"]
                                                                                for e in history]
    assert [p["label"] for p in report["policies"]] == ["sft", "ppo"]
    assert all(torch.isfinite(torch.tensor(p["kl"]["exact"]["mean"])) for p in report["policies"])
    # PPO's all-linear trained the experts too, where they are fused tensors
    assert any(".experts." in name for name in adapted(tmp_path / "ppo" / "policy")) == (family in FUSED_EXPERTS)


@pytest.mark.parametrize("family", ["llama4_text", "phimoe", "qwen3_moe"])
def test_sft_defaults_adapt_an_moe_but_its_router(family, files, tmp_path):
    """rlft sft with its default lora section (all-linear, dropout 0.05) on MoE families: routers that are
    nn.Linear subclasses returning (scores, logits) stay unwrapped, and the fused experts are trained."""
    model_dir = save_family(tmp_path / "model", family)
    metrics = run_sft(load_config(SFTConfig, None, [
        f"output_dir={tmp_path / 'sft'}", f"model.name_or_path={model_dir}", f"data.path={files / 'sft.jsonl'}",
        "lora.r=4", "train.max_steps=1", "train.batch_size=4", "num_samples=0"]))
    names = adapted(tmp_path / "sft")
    assert metrics["steps"] == 1 and metrics["eval_loss_after"] == metrics["eval_loss_after"]  # finite
    assert any(".experts." in name for name in names) and not any("router" in name for name in names)


def test_gemma3n_trains_on_left_padded_prompts(tmp_path, capsys):
    """Prompts of 1 to 6 words, so rollouts are left-padded (the matrix's all have 3): Gemma-3n's SDPA backward
    gives NaN on such rows, so rlft picks eager attention for it; forced to SDPA, the run stops in one line
    that names the attention kernel."""
    from rlft.cli import main

    model_dir = save_family(tmp_path / "model", "gemma3n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": " ".join(WORDS[: 1 + i % 6])}]})
                               + "\n" for i in range(8)))
    args = ["ppo", f"model.name_or_path={model_dir}", f"data.path={prompts}", f"reward={SCORER}", "sft_adapter=",
            "lora.r=4", "lora.dropout=0", "sampling.max_new_tokens=6", "ppo.rollout_batch_size=4",
            "ppo.mini_batch_size=4", "ppo.steps=2", "ppo.learning_rate=1e-2"]
    assert main([*args, f"output_dir={tmp_path / 'default'}"]) == 0
    assert main([*args, f"output_dir={tmp_path / 'sdpa'}", "model.attn_implementation=sdpa"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the prompts were left-padded and attention is SDPA" in line and "model.attn_implementation=eager" in line


def test_a_base_model_without_a_chat_template(files, tmp_path, capsys):
    """Message-list data on a tokenizer with no template: one line naming the fix, before the model loads;
    with model.chat_template=plain every stage renders through that template."""
    from rlft.cli import main

    model_dir = save_family(tmp_path / "model", "opt", chat_template=False)
    assert main(["sft", f"model.name_or_path={model_dir}", f"data.path={files / 'sft.jsonl'}",
                 f"output_dir={tmp_path / 'refused'}"]) == 2
    assert "has no chat template" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["ppo", f"model.name_or_path={model_dir}", f"data.path={files / 'prompts.jsonl'}",
                 f"reward={SCORER}", f"output_dir={tmp_path / 'refused_ppo'}"]) == 2
    assert "model.chat_template=plain" in capsys.readouterr().err.strip().splitlines()[-1]

    history, report = through_every_stage(model_dir, files, tmp_path, ["q_proj", "v_proj"], "model.chat_template=plain")
    assert history[0]["objective/kl"] == 0.0
    sample = json.loads((tmp_path / "sft" / "metrics.json").read_text())["samples"][0]
    assert sample["completion"] is not None
    assert json.loads((tmp_path / "ppo" / "policy" / "rlft_adapter.json").read_text())["base_model"]["chat_template"] == "plain"


def test_causal_lm_reward_backbone_trains_and_scores_in_ppo(files, tmp_path):
    """A *ForSequenceClassification head on a causal LM (how hub reward models ship), LoRA-trained, then
    PPO's `kind: model` scorer."""
    from reward_models.train import RewardConfig
    from reward_models.train import run as run_reward
    from tests.test_reward import write_marker_pairs

    model_dir = save_family(tmp_path / "model", "qwen2")
    pairs = write_marker_pairs(tmp_path / "pairs.jsonl", 64)
    metrics = run_reward(load_config(RewardConfig, None, [
        f"model.name_or_path={model_dir}", f"data.path={pairs}", f"output_dir={tmp_path / 'rm'}", "lora_enabled=true",
        "lora.r=4", "train.max_steps=20", "train.batch_size=8", "train.learning_rate=5e-3", "data.eval_fraction=0.25"]))
    assert metrics["eval_accuracy_after"] > metrics["eval_accuracy_before"]
    history = run_ppo(load_config(PPOConfig, None, [
        f"output_dir={tmp_path / 'ppo'}", f"model.name_or_path={model_dir}", f"data.path={files / 'prompts.jsonl'}",
        "sft_adapter=",
        f"reward=[{{kind: model, path: '{tmp_path / 'rm'}', normalize: true}}]", "lora.r=4", "lora.dropout=0",
        "sampling.max_new_tokens=6", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.steps=1"]))
    assert history["steps"] == 1 and history["first/objective/kl"] == 0.0


def test_a_4bit_reward_model_with_lora_trains(tiny_lm_dir_64, tmp_path):
    from reward_models.train import RewardConfig
    from reward_models.train import run as run_reward
    from tests.test_reward import write_marker_pairs

    pairs = write_marker_pairs(tmp_path / "pairs.jsonl", 48)
    metrics = run_reward(load_config(RewardConfig, None, [
        f"model.name_or_path={tiny_lm_dir_64}", f"data.path={pairs}", f"output_dir={tmp_path / 'rm'}",
        "lora_enabled=true", "model.quantization=4bit", "lora.r=4", "train.max_steps=4", "train.batch_size=8"]))
    assert metrics["steps"] == 4 and metrics["eval_accuracy_after"] >= 0


def test_peft_errors_name_the_key_peft_meant(tiny_lm_dir, files, tmp_path, capsys):
    from rlft.cli import main

    assert main(["sft", f"model.name_or_path={tiny_lm_dir}", f"data.path={files / 'sft.jsonl'}",
                 "lora.target_modules=[no_such_layer]", f"output_dir={tmp_path / 'a'}"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "bad value for 'lora.target_modules': peft says:" in line and "no_such_layer" in line


def test_rows_past_an_absolute_position_model_context_are_cut_not_crashed(files, tmp_path):
    """GPT-2 has 128 positions here; rows of ~300 tokens with train.max_length=512 trained past them."""
    model_dir = save_family(tmp_path / "model", "gpt2")
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "hello " * 20, "completion": " the cat " * 140}) + "\n"
                            for _ in range(8)))
    metrics = run_sft(load_config(SFTConfig, None, [
        f"output_dir={tmp_path / 'sft'}", f"model.name_or_path={model_dir}", f"data.path={long}", "lora.r=4",
        "train.max_steps=2", "train.batch_size=4", "train.max_length=512", "num_samples=0"]))
    assert metrics["steps"] == 2 and metrics["eval_loss_after"] == metrics["eval_loss_after"]  # finite, not NaN


def test_completions_wholly_past_the_cut_are_one_line(files, tmp_path, capsys):
    from rlft.cli import main

    model_dir = save_family(tmp_path / "model", "gpt2")  # 128 positions
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "hello " * 150, "completion": " the cat"}) + "\n" for _ in range(8)))
    assert main(["sft", f"output_dir={tmp_path / 'sft'}", f"model.name_or_path={model_dir}", f"data.path={long}",
                 "train.max_steps=1"]) == 2
    assert "row keeps a completion token within train.max_length" in capsys.readouterr().err
