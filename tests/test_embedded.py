"""End to end on the real embedded SmolLM2-135M (slow: a minute or two each on a 2-core CPU).

The fast tests use tiny random models; these check that the shipped configs work on the real thing:
the GGUF conversion, the chat template, 4-bit loading, and PPO from an SFT adapter.
"""

import json
from pathlib import Path

import pytest
import torch

from rlft.config import load_config

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parents[1] / "configs"
SHORT_SFT = ["data.max_samples=32", "data.max_eval_samples=16", "train.batch_size=8", "num_samples=1"]


def cheerful(prompts, completions):
    """A rule reward for the PPO smoke test: exclamation marks, capped."""
    return [min(c.count("!"), 3) / 3 for c in completions]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    from rlft.sft import SFTConfig, run

    out = tmp_path_factory.mktemp("sft")
    metrics = run(load_config(SFTConfig, CONFIGS / "sft.yaml", [f"output_dir={out}", *SHORT_SFT]))
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"], metrics
    return out


def test_sft_adapter_loads_with_peft_and_generates(sft_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlft.models import resolve

    base = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m-instruct"))
    model = PeftModel.from_pretrained(base, sft_dir)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert len(tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).split()) > 1


def test_qlora_4bit_sft_trains(tmp_path):
    from rlft.sft import SFTConfig, run

    metrics = run(load_config(SFTConfig, CONFIGS / "sft_qlora.yaml",
                              [f"output_dir={tmp_path}", *SHORT_SFT, "train.learning_rate=1e-3"]))
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"], metrics
    config = json.loads((tmp_path / "rlft_adapter.json").read_text())
    assert config["base_model"]["quantization"] == "4bit"


def test_ppo_from_sft_adapter_starts_at_kl_zero(sft_dir, tmp_path):
    from rlft.ppo.config import PPOConfig
    from rlft.ppo.train import run

    run(load_config(PPOConfig, CONFIGS / "ppo.yaml", [
        f"output_dir={tmp_path}", f"sft_adapter={sft_dir}", "reward=[{kind: function, path: 'tests.test_embedded:cheerful'}]",
        "ppo.steps=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "sampling.max_new_tokens=12"]))
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["objective/kl"] == 0.0  # the reference is the SFT model: identical at step 0
    assert steps[1]["objective/kl"] != 0.0 and torch.isfinite(torch.tensor(steps[1]["loss/policy"]))
    assert (tmp_path / "policy" / "adapter_model.safetensors").is_file()
