"""Data formats, LoRA / QLoRA model building and the SFT stage on a tiny model."""

import json
import math

import pytest
import torch

from rlft.cli import main
from rlft.config import DataConfig, LoraConfig, ModelConfig, load_config
from rlft.data import chatterbot_pairs, load_splits, prompts_of, to_prompt_completion
from rlft.errors import RlftError
from rlft.models import add_lora, load_model
from rlft.sft import SFTConfig, run

# Four replies, each to eight wordings of its prompt: held-out rows are prompts training never saw (a hold-out
# keeps a repeated prompt on one side), whose replies a model that learned can still predict.
ROWS = [(f"{prompt} {'?' * i}", reply) for i in range(1, 9) for prompt, reply in [
    ("hello how are you", "i am good , thanks !"), ("tell me a joke", "why the cat ? because the dog !"),
    ("what is the sun", "the sun is big and red"), ("do you love rain", "yes i love rain and night")]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def datasets_by_format(tmp_path):
    return {
        "conversational": write_jsonl(tmp_path / "messages.jsonl", [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in ROWS]),
        "prompt_completion": write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": " " + c} for p, c in ROWS]),
        "text": write_jsonl(tmp_path / "text.jsonl", [{"text": f"{p} {c}"} for p, c in ROWS]),
    }


@pytest.mark.parametrize("data_format", ["conversational", "prompt_completion", "text"])
def test_each_format_is_detected_and_split(datasets_by_format, data_format):
    config = DataConfig(path=str(datasets_by_format[data_format]), eval_fraction=0.25)
    train, evaluation, detected = load_splits(config, ("conversational", "prompt_completion", "text"))
    assert detected == data_format
    assert len(train) == 24 and len(evaluation) == 8


def test_messages_split_at_the_last_reply(datasets_by_format):
    train, _, _ = load_splits(DataConfig(path=str(datasets_by_format["conversational"])), ("conversational",))
    row = to_prompt_completion(train)[0]
    assert [m["role"] for m in row["prompt"]] == ["user"] and row["completion"][0]["role"] == "assistant"
    assert prompts_of(train)[0] == row["prompt"]


def test_builtin_chatterbot_has_held_out_dialog_pairs():
    pairs = chatterbot_pairs()
    assert len(pairs) > 1000  # 1,229 distinct (statement, reply) pairs
    assert pairs[0]["prompt"][0]["role"] == "user" and pairs[0]["completion"][0]["role"] == "assistant"


@pytest.mark.parametrize("path, message", [
    ("missing.jsonl", "data file 'missing.jsonl' not found"),
    ("no/such/dir.csv", "not found"),
])
def test_missing_data_is_a_clear_error(path, message):
    with pytest.raises(RlftError, match=message):
        load_splits(DataConfig(path=path), ("text",))


def test_wrong_columns_name_both_sides(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}] * 4)
    with pytest.raises(RlftError, match=r"has columns \['answer', 'question'\] but needs messages or prompt\+completion"):
        load_splits(DataConfig(path=str(path)), ("conversational", "prompt_completion"))


def test_lora_trains_only_the_adapter(tiny_lm_dir):
    config = ModelConfig(name_or_path=str(tiny_lm_dir))
    model = add_lora(load_model(config), config, LoraConfig(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: attention and MLP projections of every layer, never the LM head
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)


@pytest.mark.parametrize("quantization, weight_class", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_qlora_base_is_quantized_and_adapter_gets_gradients(tiny_lm_dir_64, quantization, weight_class):
    config = ModelConfig(name_or_path=str(tiny_lm_dir_64), quantization=quantization)
    model = add_lora(load_model(config), config, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    assert any(type(m).__name__ == weight_class for m in model.modules())
    ids = torch.randint(4, 60, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def sft_overrides(tiny_lm_dir, data, out, *extra):
    return [f"output_dir={out}", f"model.name_or_path={tiny_lm_dir}", f"data.path={data}", "data.eval_fraction=0.25",
            "lora.r=8", "lora.alpha=16", "train.learning_rate=5e-3", "train.batch_size=8", "train.epochs=6",
            "train.logging_steps=2", "train.save_steps=10", "num_samples=2", *extra]


def test_sft_run_lowers_eval_loss_and_saves_a_loadable_adapter(tiny_lm_dir, datasets_by_format, tmp_path):
    from peft import PeftModel

    out = tmp_path / "sft"
    metrics = run(load_config(SFTConfig, None, sft_overrides(tiny_lm_dir, datasets_by_format["prompt_completion"], out)))
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.5, metrics
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "metrics.json", "rlft_adapter.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    model = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path=str(tiny_lm_dir))), out)
    assert model.generate(input_ids=torch.tensor([[5, 12, 14]]), max_new_tokens=3, do_sample=False).shape[1] > 3


def test_sft_in_bfloat16_learns_like_float32(tiny_lm_dir, datasets_by_format, tmp_path):
    """The HF Trainer's bf16 switch on a bf16 base: the adapter stays float32 and the loss falls as in float32."""
    from safetensors.torch import load_file

    after = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        metrics = run(load_config(SFTConfig, None, [
            *sft_overrides(tiny_lm_dir, datasets_by_format["prompt_completion"], out), f"model.dtype={dtype}"]))
        assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.5, (dtype, metrics)
        assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
        after[dtype] = metrics["eval_loss_after"]
    assert after["bfloat16"] == pytest.approx(after["float32"], abs=0.1), after


def test_sft_qlora_and_merge(tiny_lm_dir_64, datasets_by_format, tmp_path):
    out = tmp_path / "qlora"
    overrides = sft_overrides(tiny_lm_dir_64, datasets_by_format["conversational"], out, "model.quantization=4bit",
                              "merge=true", "train.epochs=2", "num_samples=0")
    metrics = run(load_config(SFTConfig, None, overrides))
    assert math.isfinite(metrics["eval_loss_after"]) and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("override, message", [
    ("data.path=nope.jsonl", "data file 'nope.jsonl' not found"),
    ("lora.r=0", "bad value for 'lora.r'"),
    ("model.name_or_path=no-such-model-xyz", "model 'no-such-model-xyz' not found"),
    ("trian.epochs=1", "unknown config key 'trian'"),
])
def test_sft_bad_input_exits_2_with_one_line(tiny_lm_dir, datasets_by_format, tmp_path, capsys, override, message):
    args = ["sft", *sft_overrides(tiny_lm_dir, datasets_by_format["text"], tmp_path / "bad"), override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not any("Traceback" in line for line in err)


def test_sft_missing_column_exits_2(tiny_lm_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "b"}] * 4)
    assert main(["sft", *sft_overrides(tiny_lm_dir, data, tmp_path / "bad")]) == 2
    assert "needs messages or prompt+completion or text" in capsys.readouterr().err


def test_a_hub_dataset_name_reaches_the_hub_loader(monkeypatch):
    """'org/name' that is no local path goes to datasets.load_dataset as a hub name (it was read as a file)."""
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or
                        datasets.Dataset.from_list([{"text": "hello"}, {"text": "hi"}]))
    train, _, data_format = load_splits(DataConfig(path="trl-lib/Capybara", subset="default"), ("text",))
    assert calls[0] == (("trl-lib/Capybara", "default"), {"split": "train"}) and data_format == "text"


def test_peft_errors_name_the_key_they_concern():
    from rlft.models import peft_error

    moe = ValueError("lora_dropout is not supported for target_parameters (ParamWrapper); set lora_dropout=0")
    assert str(peft_error(moe)).startswith("bad value for 'lora.dropout': peft says: lora_dropout is not supported")
    assert str(peft_error(ValueError("something else entirely"))).startswith("peft refused the lora section")
