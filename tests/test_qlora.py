"""QLoRA on CPU trains on the right gradients: after an eval-mode forward, against a dequantized fp32 twin,
and it learns about as much as LoRA."""

import json

import pytest
import torch

from rlft.config import LoraConfig, ModelConfig, load_config
from rlft.models import add_lora, load_model
from rlft.sft import SFTConfig, run


def save_qwen2_64(folder):
    """A 64-wide Qwen2 (biases on q/k/v: the layers whose repacked 4-bit path crashed in backward)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests import tiny

    tokenizer = tiny.build_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 initializer_range=0.2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base_64(request, tiny_lm_dir_64, tmp_path_factory):
    return tiny_lm_dir_64 if request.param == "llama" else save_qwen2_64(tmp_path_factory.mktemp("qwen2_64"))


def lora_gradients(model, input_ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def quantized_with_lora(path, quantization):
    config = ModelConfig(name_or_path=str(path), quantization=quantization)
    torch.manual_seed(0)
    model = add_lora(load_model(config), config, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # B != 0, so A's gradients are not all zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    return model


def dequantized_twin(quantized, path):
    """The same LoRA weights on a float32 base whose linear weights are the quantized ones, dequantized."""
    import bitsandbytes.functional as F

    config = ModelConfig(name_or_path=str(path))
    twin = add_lora(load_model(config), config, LoraConfig(r=4, alpha=8, dropout=0.0))
    twin_modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if not type(module).__module__.startswith("bitsandbytes"):
                continue  # peft's wrappers: their base_layer is the bitsandbytes module
            weight = module.weight
            if type(weight).__name__ == "Params4bit":
                twin_modules[name].weight.copy_(F.dequantize_4bit(weight.data, weight.quant_state).float())
            else:  # int8 rows and their absmax scales (moved to the layer's state after a forward)
                scales = weight.SCB if weight.SCB is not None else module.state.SCB
                twin_modules[name].weight.copy_(weight.data.float() * scales.float()[:, None] / 127)
        twin_parameters = dict(twin.named_parameters())
        for name, parameter in quantized.named_parameters():
            if parameter.requires_grad:
                twin_parameters[name].copy_(parameter)
    return twin


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_lora_gradients_are_unchanged_by_an_eval_forward_and_match_the_dequantized_model(
        base_64, quantization, monkeypatch):
    """Take the path of the CPUs with AVX512-BF16, where bitsandbytes repacks 4-bit weights into an
    inference-only layout at the first eval-mode no-grad forward (SFT's eval before training, PPO's rollouts)."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model = quantized_with_lora(base_64, quantization)
    input_ids = torch.randint(4, 60, (3, 12), generator=torch.Generator().manual_seed(0))
    train_only = lora_gradients(model, input_ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)
    after_eval = lora_gradients(model, input_ids)
    for name, gradient in train_only.items():
        torch.testing.assert_close(after_eval[name], gradient, rtol=0, atol=0, msg=name)

    reference = lora_gradients(dequantized_twin(model, base_64), input_ids)
    flat = lambda grads: torch.cat([grads[name].flatten() for name in sorted(grads)])  # noqa: E731
    relative = (flat(after_eval) - flat(reference)).norm() / flat(reference).norm()
    # 4-bit: the same dequantized weights in float32, so only summation order differs; 8-bit: bitsandbytes
    # casts the activations to float16 on CPU.
    assert relative < (1e-4 if quantization == "4bit" else 2e-2), relative.item()


def test_qlora_sft_learns_about_as_much_as_lora(tiny_lm_dir_64, tmp_path):
    """Same data, steps and learning rate: QLoRA's held-out eval-loss drop is at least 80% of LoRA's."""
    from tests.test_sft import ROWS as rows  # distinct prompts: a hold-out takes whole prompts
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": " " + c}) + "\n" for p, c in rows))
    drops = {}
    for quantization in ("none", "4bit"):
        metrics = run(load_config(SFTConfig, None, [
            f"output_dir={tmp_path / quantization}", f"model.name_or_path={tiny_lm_dir_64}", f"data.path={data}",
            f"model.quantization={quantization}", "lora.r=8", "lora.alpha=16", "train.learning_rate=5e-3",
            "train.batch_size=8", "train.epochs=4", "num_samples=0"]))
        drops[quantization] = metrics["eval_loss_before"] - metrics["eval_loss_after"]
    assert drops["none"] > 0.5, drops
    assert drops["4bit"] >= 0.8 * drops["none"], drops


def test_no_4bit_model_repacks_its_weights_for_inference(tiny_lm_dir_64):
    """bitsandbytes' CPU repack (AVX512-BF16) makes 4-bit weights inference-only and crashes on some layer
    shapes; every 4-bit load switches it off, eval's (no adapter added) as well as training's."""
    from rlft.config import ModelConfig
    from rlft.models import load_model

    model = load_model(ModelConfig(name_or_path=str(tiny_lm_dir_64), quantization="4bit"))
    flags = [getattr(m, "support_avx512bf16_for_cpu", None) for m in model.modules()]
    assert any(flag is False for flag in flags) and not any(flags)
