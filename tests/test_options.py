"""What LoRA/QLoRA tutorial readers reach for: optimizers, warm-up steps, adapter kinds and options, model
cards and hub pushes."""

import json
from pathlib import Path

import pytest
import torch

from rlft.cli import main
from rlft.config import ModelConfig, load_config
from tests.test_faults import ppo_args, sft_args
from tests.test_ppo import history, ppo_config


def test_paged_8bit_adamw_trains_sft(tiny_lm_dir, data, tmp_path):
    assert main(sft_args(tiny_lm_dir, data, tmp_path / "sft", "train.optim=paged_adamw_8bit", "train.max_steps=24",
                         "train.save_steps=100")) == 0
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.5, metrics


def test_ppo_builds_the_optimizer_the_trainer_would():
    import bitsandbytes as bnb

    from rlft.hf_training import optimizer

    parameter = torch.nn.Parameter(torch.randn(64, 64))
    paged = optimizer([parameter], "paged_adamw_8bit", 1e-3)
    parameter.sum().backward()
    paged.step()
    assert isinstance(paged, bnb.optim.optimizer.Optimizer8bit) and paged.is_paged
    assert paged.state[parameter]["state1"].dtype == torch.uint8  # 8-bit moments
    adamw = optimizer([parameter], "adamw_torch", 1e-3, eps=1e-5, weight_decay=0.1)
    assert type(adamw) is torch.optim.AdamW
    assert (adamw.defaults["eps"], adamw.param_groups[0]["lr"], adamw.param_groups[0]["weight_decay"]) == (1e-5, 1e-3, 0.1)


def test_an_unknown_optimizer_is_one_line_with_the_nearest_name(tiny_lm_dir, data, tmp_path, capsys):
    assert main(sft_args(tiny_lm_dir, data, tmp_path / "a", "train.optim=paged_adamw_8bt")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlft sft: error: bad value for 'train.optim': unknown optimizer 'paged_adamw_8bt'; did you mean "
        "'paged_adamw_8bit'?")
    assert main(ppo_args(tiny_lm_dir, data, tmp_path / "b", "ppo.optim=sgdd")) == 2
    assert "bad value for 'ppo.optim': unknown optimizer 'sgdd'" in capsys.readouterr().err


def test_warmup_steps_ramp_the_learning_rate(tiny_lm_dir, data, tmp_path):
    assert main(sft_args(tiny_lm_dir, data, tmp_path / "sft", "train.warmup_steps=4", "train.logging_steps=1",
                         "train.lr_scheduler=constant_with_warmup", "train.save_steps=100")) == 0
    state = json.loads(sorted((tmp_path / "sft" / "checkpoints").glob("checkpoint-*"))[-1].joinpath(
        "trainer_state.json").read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    # constant_with_warmup: step s trains at lr * s / 4 (the log shows the rate step s used, s = 0..3), then 5e-3
    assert rates[:4] == pytest.approx([5e-3 * s / 4 for s in (0, 1, 2, 3)]) and rates[4:] == pytest.approx([5e-3] * 4)


@pytest.mark.parametrize("adapter, rise", [
    (["lora.use_dora=true"], 0.1), (["lora.use_rslora=true"], 0.1), (["lora.init=gaussian"], 0.1),
    # (IA)3 learns a few thousand scales where LoRA learns a low-rank update: a smaller, slower rise
    (["lora.kind=ia3", "ppo.learning_rate=3e-2", "ppo.steps=40"], 0.05),
], ids=["dora", "rslora", "gaussian", "ia3"])
def test_each_adapter_kind_starts_at_the_reference_and_learns(adapter, rise, tiny_lm_dir, data, tmp_path):
    from rlft.ppo.train import run

    run(ppo_config(tiny_lm_dir, data / "prompts.jsonl", tmp_path, "ppo.steps=30", "save_every=100", *adapter))
    entries = history(tmp_path)
    assert entries[0]["objective/kl"] == 0.0  # adapter on == adapter off, exactly, before the first update
    scores = [entry["objective/scores"] for entry in entries]
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + rise, scores


def test_ia3_trains_only_scaling_vectors(tiny_lm_dir):
    from rlft.config import LoraConfig, ModelConfig
    from rlft.models import add_lora, load_model

    config = ModelConfig(name_or_path=str(tiny_lm_dir))
    model = add_lora(load_model(config), config, LoraConfig(kind="ia3"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("ia3_l" in name for name in trainable)


def test_lora_bias_trains_biases_in_sft_and_ppo_refuses_it(tmp_path):
    from rlft.config import ConfigError, LoraConfig, ModelConfig
    from rlft.models import add_lora, load_model
    from rlft.ppo.config import PPOConfig
    from tests.test_qlora import save_qwen2_64

    folder = save_qwen2_64(tmp_path / "qwen2")
    config = ModelConfig(name_or_path=str(folder))
    model = add_lora(load_model(config), config, LoraConfig(bias="lora_only", target_modules=["q_proj"]))
    biases = [name for name, p in model.named_parameters() if p.requires_grad and name.endswith("bias")]
    assert biases and all("q_proj" in name for name in biases)
    with pytest.raises(ConfigError, match="bad value for 'lora.bias'"):
        load_config(PPOConfig, None, ["lora.bias=all"])
    with pytest.raises(ConfigError, match="LoRA options"):
        load_config(PPOConfig, None, ["lora.kind=ia3", "lora.use_dora=true"])


def test_every_saved_model_has_a_model_card(tiny_lm_dir, tiny_reward_dir, data, tmp_path):
    from huggingface_hub import ModelCard

    from tests.test_faults import reward_args

    assert main(sft_args(tiny_lm_dir, data, tmp_path / "sft", "train.max_steps=2")) == 0
    assert main(reward_args(tiny_reward_dir, data, tmp_path / "rm", "train.max_steps=2")) == 0
    assert main(ppo_args(tiny_lm_dir, data, tmp_path / "ppo", f"sft_adapter={tmp_path / 'sft'}", "ppo.steps=2")) == 0
    cards = {stage: ModelCard.load(folder / "README.md") for stage, folder in
             (("sft", tmp_path / "sft"), ("reward", tmp_path / "rm"), ("ppo", tmp_path / "ppo" / "policy"))}
    assert cards["sft"].data.base_model == str(tiny_lm_dir) and cards["sft"].data.library_name == "peft"
    assert "eval_loss_after" in cards["sft"].text and "lora:" in cards["sft"].text  # metrics and config
    assert cards["reward"].data.pipeline_tag == "text-classification" and "eval_accuracy_after" in cards["reward"].text
    assert f"`sft ({tmp_path / 'sft'})` -> `reward (tests.test_ppo:share_of_target)` -> `ppo`" in cards["ppo"].text
    assert {"rlft", "ppo"} <= set(cards["ppo"].data.tags)


def test_push_to_hub_offline_is_one_line_after_saving(tiny_lm_dir, data, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(sft_args(tiny_lm_dir, data, out, "train.max_steps=1", "push_to_hub=true", "hub_model_id=me/tiny")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("rlft sft: error: cannot push to the hub repo 'me/tiny': the hub is unreachable (offline)")
    assert f"hf upload me/tiny {out}" in line
    assert (out / "metrics.json").is_file() and (out / "adapter_model.safetensors").is_file()  # nothing lost


def test_new_options_are_documented(capsys):
    for stage, keys in (("sft", ("train.optim", "train.warmup_steps", "lora.kind", "lora.use_dora", "lora.use_rslora",
                                 "lora.bias", "lora.init", "push_to_hub", "hub_model_id", "model.chat_template")),
                        ("ppo", ("ppo.optim", "lora.kind", "push_to_hub")), ("reward", ("train.optim", "push_to_hub"))):
        assert main([stage, "--list-options"]) == 0
        listed = {line.split(" ", 1)[0] for line in capsys.readouterr().out.splitlines()}
        assert set(keys) <= listed, set(keys) - listed
    assert main(["ppo", "--list-options"]) == 0  # each entry of a list of sections: the built-in reward functions
    listed = {line.split(" ", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"reward[].kind", "reward[].path", "reward[].args", "reward[].weight"} <= set(listed)
    for function in ("reward_models.verifiable:accuracy", ":format", ":overlong", "reward_models.judges:sentiment"):
        assert function in listed["reward[].path"], function
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for key in ("train.optim", "warmup_steps", "lora.kind", "use_dora", "use_rslora", "lora.bias", "push_to_hub",
                "model.chat_template"):
        assert key in readme, key


def test_push_uploads_the_model_without_training_state(tiny_lm_dir, data, tmp_path, monkeypatch):
    """The call path with a reachable hub (stood in for): one repo, the saved folder, checkpoints left out."""
    import huggingface_hub

    from rlft import hub

    calls = []
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    out = tmp_path / "sft"
    assert main(sft_args(tiny_lm_dir, data, out, "train.max_steps=1", "push_to_hub=true", "hub_model_id=me/tiny",
                         "hub_private=false")) == 0
    assert calls[0] == ("create", "me/tiny", {"private": False, "exist_ok": True})
    upload = calls[1][1]
    assert upload["repo_id"] == "me/tiny" and upload["folder_path"] == str(out)
    assert {"checkpoints/**", "tensorboard/**", ".*"} <= set(upload["ignore_patterns"])


@pytest.mark.parametrize("flags, env, expected", [
    ("fpu avx2 avx512f avx512_bf16 amx_tile", "1", torch.bfloat16),
    ("fpu avx2 amx_bf16 amx_tile", "1", torch.bfloat16),
    ("fpu avx2 avx512f avx512_vnni", "1", torch.float32),   # AVX-512 alone emulates bf16: slower than float32
    ("fpu avx2 avx512f avx512_bf16", "0", torch.float32),   # RLFT_CPU_BF16=0 says no
])
def test_auto_dtype_is_bf16_on_a_cpu_with_bf16_units(flags, env, expected, monkeypatch):
    from pathlib import Path

    from rlft import models

    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: f"flags\t\t: {flags}\n" if str(self) == "/proc/cpuinfo"
                        else real(self, *a, **k))
    monkeypatch.setenv("RLFT_CPU_BF16", env)
    models.cpu_has_bf16.cache_clear()
    try:
        assert models.torch_dtype(ModelConfig(), "cpu") == expected
        assert models.torch_dtype(ModelConfig(dtype="float32"), "cpu") == torch.float32  # an explicit dtype wins
    finally:
        models.cpu_has_bf16.cache_clear()
