"""`rlft plan` and `--dry-run`: a 7B plan checked part by part by hand, the problems a dry run must catch in
seconds without loading weights (a line each, exit 2), and nothing written by a good one."""

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, PreTrainedModel

from rlft import memory
from rlft.cli import main
from rlft.config import LoraConfig, ModelConfig
from rlft.fit import Device, knobs, sampling_knobs, verdict
from rlft.generation import SamplingConfig, packing_supported
from rlft.models import empty_model
from rlft.plan import Setting, StagePlan, layer_bytes, sampling_copies, size_policy
from tests import tiny
from tests.test_faults import ppo_args, reward_args, sft_args
from tests.test_pipeline import tiny_overrides

ROOT = Path(__file__).parents[1]
GIB = 2**30
SETTING = Setting(Device("cuda", 80 * GIB, "a GPU of 80 GiB"))


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory) -> ModelConfig:
    """A Llama-2-7B-shaped config.json and nothing else: no weights anywhere to load."""
    folder = tmp_path_factory.mktemp("llama_7b")
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000).save_pretrained(folder)
    return ModelConfig(name_or_path=str(folder), dtype="bfloat16")


def test_a_7b_plan_is_the_arithmetic_by_hand(llama_7b):
    h, i, layers, vocab = 4096, 11008, 32, 32000
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    shape, adapter, adapted, context = size_policy(llama_7b, LoraConfig(r=16, target_modules=targets))

    # q, k, v, o are h x h (32 KV heads of 128: k and v are full width too); gate, up, down are h x i
    linear = layers * (4 * h * h + 3 * h * i)
    # the embedding and the untied head (V x h each), two RMSNorms per layer and the final one
    rest = 2 * vocab * h + (2 * layers + 1) * h
    assert (shape.parameters, shape.quantizable) == (linear + rest, linear) == (6_738_415_616, 6_476_005_376)
    assert (shape.layers, shape.hidden, shape.vocab, shape.kv_heads, shape.head_dim) == (32, 4096, 32000, 32, 128)
    # LoRA adds r x (in + out) per adapted layer: 16 x 8192 on each of q, k, v, o, 16 x 15104 on gate, up, down
    lora = layers * 16 * (4 * (h + h) + 3 * (h + i))
    assert adapter == lora == 39_976_960
    assert adapted == linear  # every linear layer but the head: all merged into a copy while sampling
    assert context == 2048  # LlamaConfig's default max_position_embeddings

    # What a layer keeps per token is measured on fake tensors (tests/test_activations.py checks the measure):
    # at least peft's float32 copy of each adapted linear's input (h wide for q, k, v, o, gate and up, i for down)
    kept = layer_bytes(StagePlan("sft"), empty_model(llama_7b), llama_7b, LoraConfig(r=16, target_modules=targets),
                       SETTING)
    assert kept > 4 * (6 * h + i)
    w = memory.Workload(shape, dtype_bytes=2, adapter=adapter, trains=True, optim="adamw_torch", rows=4, tokens=1024,
                        per_token_layer=kept, logit_rows=4, logit_tokens=1024, generate_rows=16, generate_tokens=512)
    parts = {part.key: part for part in memory.parts(w)}
    assert parts["weights"].bytes == (linear + rest) * 2 == 13_476_831_232  # bfloat16: 12.55 GiB
    assert parts["adapter"].bytes == lora * 4  # float32 adapters
    assert parts["gradients"].bytes == lora * 4
    assert parts["optimizer"].bytes == lora * 8  # AdamW: exp_avg and exp_avg_sq, float32
    assert parts["activations"].bytes == 4 * 1024 * 32 * kept
    assert parts["logits"].bytes == 4 * 1024 * 32000 * 4  # float32 for the loss: 500 MiB
    # 16 rows x 512 tokens x 32 layers x 32 KV heads x 128 x (key and value) x 2 bytes = exactly 4 GiB
    assert parts["kv_cache"].bytes == 16 * 512 * 32 * 32 * 128 * 2 * 2 == 4 * GIB
    always = sum(part.bytes for part in parts.values() if part.phase == "always")
    forward = sum(part.bytes for part in parts.values() if part.phase == "forward")
    assert memory.peak(list(parts.values())) == always + max(forward, 4 * GIB + linear * 2)  # generate: KV + merged

    # 4-bit NF4 with double quantisation: 4.127 bits per linear weight; embeddings, norms and head float32 (peft)
    four_bit = {part.key: part.bytes for part in memory.parts(replace(w, quantization="4bit"))}
    assert four_bit["weights"] == pytest.approx(linear * 4.127 / 8 + rest * 4)  # 4.1 GiB
    # sampling or scoring on a 4-bit base prepares nothing for training: the rest stays bfloat16
    assert memory.weight_bytes(linear + rest, linear, 2, "4bit") == pytest.approx(linear * 4.127 / 8 + rest * 2)
    assert memory.optimizer_state_bytes("paged_adamw_8bit") == 2  # two states, a byte each
    # on a CPU the float32 weights bitsandbytes dequantizes per matmul fragment the heap by half the activations;
    # a GPU's caching allocator reuses those blocks, and a base in bfloat16 dequantizes nothing
    assert four_bit["dequantized_slack"] == 0.5 * parts["activations"].bytes
    assert "dequantized_slack" not in {part.key for part in memory.parts(replace(w, quantization="4bit",
                                                                                 device="cuda"))}
    assert "dequantized_slack" not in parts
    # gradient checkpointing keeps each layer's input (4096 x 2 B a token) and one layer's full set
    checkpointed = {part.key: part.bytes for part in memory.parts(replace(w, gradient_checkpointing=True))}
    assert checkpointed["activations"] == 4 * 1024 * (32 * 4096 * 2 + kept)

    # FSDP over 4 processes: weights, adapters, gradients and optimizer state are quartered, two layers gathered
    fsdp = {part.key: part.bytes for part in memory.parts(replace(w, processes=4, strategy="fsdp"))}
    for key in ("weights", "adapter", "gradients", "optimizer"):
        assert fsdp[key] == parts[key].bytes / 4, key
    assert fsdp["fsdp_gathered"] == 2 * (linear + rest) * 2 / 32
    assert fsdp["kv_cache"] == parts["kv_cache"].bytes  # each process decodes its own rows
    ddp = {part.key: part.bytes for part in memory.parts(replace(w, processes=4))}
    assert ddp["weights"] == parts["weights"].bytes and ddp["ddp_buckets"] == lora * 4  # a full copy each
    # every process of a launch holds a process group (400 MiB measured on a CPU); one process holds none
    assert fsdp["distributed"] == ddp["distributed"] == 400 * 2**20 and "distributed" not in parts


def test_a_plan_that_does_not_fit_names_the_first_knob_that_makes_it_fit(llama_7b):
    shape, adapter, _, _ = size_policy(llama_7b, LoraConfig(r=16))
    # a layer keeping 400 KiB a token (a 7B's LoRA layer keeps about that): 2048 x 32 x 400 KiB = 25 GiB a row
    w = memory.Workload(shape, 2, adapter=adapter, trains=True, rows=8, tokens=2048, per_token_layer=400 * 1024,
                        logit_rows=8, logit_tokens=2048, device="cuda")
    change = lambda rows, steps: f"train.batch_size={rows} train.gradient_accumulation_steps={steps}"  # noqa: E731
    plan = StagePlan("sft", workload=w, knobs=knobs(w, 1, change))
    # 12.6 GiB of bf16 weights, 1.2 GiB of runtime, adapter, its gradients and AdamW state, and per row 25 GiB of
    # activations and 0.25 GiB of logits: 8 rows need 216 GiB, 4 rows 115, 2 rows 64.5
    said = verdict(plan, Setting(Device("cuda", 80 * GIB, "a GPU of 80 GiB")))
    assert said.startswith("does not fit")
    assert "first set train.batch_size=2 train.gradient_accumulation_steps=4" in said
    said = verdict(plan, Setting(Device("cuda", 141 * GIB, "a GPU of 141 GiB")))
    assert said.startswith("does not fit") and "first set train.batch_size=4 train.gradient_accumulation_steps=2" in said
    assert verdict(plan, Setting(Device("cuda", 256 * GIB, "256 GiB"))).startswith("fits")
    said = verdict(plan, Setting(Device("cuda", 8 * GIB, "a GPU of 8 GiB")))  # only 4-bit comes close
    assert "no one knob is enough" in said


@pytest.mark.skipif(not packing_supported(), reason="no oneDNN bf16 kernels on this CPU: sampling packs nothing")
def test_sampling_on_a_bf16_cpu_counts_the_prepacked_copy_and_offers_to_drop_it(llama_7b):
    shape, adapter, adapted, _ = size_policy(llama_7b, LoraConfig(r=16))
    cpu = Setting(Device("cpu", 64 * GIB, "a CPU with 64 GiB"))

    def copies(model=llama_7b, sampling=SamplingConfig(), setting=cpu):
        return sampling_copies(model, sampling, setting, LoraConfig(r=16), adapted, shape)
    # the adapted layers pack from their merged copy (one copy); the head, embeddings and norms are counted as
    # packed too (at most every parameter): one copy of all weights in all
    assert copies() == {"merged": adapted, "packed": shape.parameters - adapted}
    assert copies(sampling=SamplingConfig(pack_weights=False)) == {"merged": adapted, "packed": 0}
    assert copies(model=replace(llama_7b, dtype="float32")) == {"merged": adapted, "packed": 0}
    assert copies(setting=SETTING) == {"merged": adapted, "packed": 0}  # a GPU: F.linear as it is
    # a 4-bit base merges nothing; bitsandbytes keeps the bf16 head, which is packed: V x h
    assert copies(model=replace(llama_7b, quantization="4bit")) == {"merged": 0, "packed": 32000 * 4096}

    w = memory.Workload(shape, 2, adapter=adapter, generate_rows=8, generate_tokens=512, **copies())
    unpacked = dict(sampling_knobs(w))["sampling.pack_weights=false"]
    assert memory.peak(memory.parts(w)) - memory.peak(memory.parts(unpacked)) == (shape.parameters - adapted) * 2


# ---------------------------------------------------------------------------------------------------
# --dry-run: seconds, no weights, one line per problem


@pytest.fixture(scope="module")
def weightless(tiny_lm_dir, tmp_path_factory):
    """The tiny Llama's config and tokenizer without its weights: a check that loaded them would fail."""
    folder = tmp_path_factory.mktemp("weightless")
    for file in tiny_lm_dir.iterdir():
        if file.suffix not in (".safetensors", ".bin"):
            shutil.copy(file, folder)
    return folder


@pytest.fixture(scope="module")
def base_without_template(weightless, tmp_path_factory):
    """A base model whose tokenizer has no chat template."""
    folder = tmp_path_factory.mktemp("no_template")
    shutil.copy(weightless / "config.json", folder)
    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any model's weights is a test failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def dry_run(args: list[str], capsys) -> tuple[int, str, list[str], float]:
    started = time.perf_counter()
    code = main([*args, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines(), time.perf_counter() - started


def test_dry_run_catches_each_problem_in_seconds_without_weights(weightless, base_without_template, data, tmp_path,
                                                                  capsys, no_weights):
    (tmp_path / "a_file").write_text("")
    long_prompts = tmp_path / "long_prompts.jsonl"  # 240 words: with 32 new tokens past the tiny model's 256
    long_prompts.write_text("".join(json.dumps({"prompt": f"hello {i} " * 120}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    cases = {
        "a wrong target module": (sft_args(weightless, data, out, "lora.target_modules=[q_projx]"),
                                  "sft", "bad value for 'lora.target_modules'"),
        "no chat template": (ppo_args(base_without_template, data, out), "ppo", "has no chat template"),
        "a prompt past the context": (ppo_args(weightless, data, out, f"data.path={long_prompts}",
                                               "sampling.max_prompt_length=512", "sampling.max_new_tokens=32"),
                                      "ppo", "longer than the model's context (256 tokens)"),
        "a missing reward file": (ppo_args(weightless, data, out, "reward=[{kind: function, path: 'gone.py:score'}]"),
                                  "ppo", "no file 'gone.py'"),
        "a missing reward function": (ppo_args(weightless, data, out,
                                               "reward=[{kind: function, path: 'tests.test_ppo:no_such'}]"),
                                      "ppo", "has no attribute 'no_such'"),
        "a missing reward model": (ppo_args(weightless, data, out, f"reward=[{{path: {tmp_path / 'no_reward'}}}]"),
                                   "ppo", "no_reward' not found"),
        "an unwritable output dir": (sft_args(weightless, data, tmp_path / "a_file" / "run"), "sft",
                                     "cannot write to output_dir"),
    }
    for name, (args, stage, words) in cases.items():
        code, _, err, seconds = dry_run(args, capsys)
        assert code == 2, name
        assert len(err) == 1 and err[0].startswith(f"rlft {stage}: error: ") and words in err[0], (name, err)
        assert seconds < 15, (name, seconds)
    assert not out.exists()


def test_dry_run_of_a_good_config_exits_0_and_writes_nothing(weightless, tiny_reward_dir, data, tmp_path, capsys,
                                                             no_weights):
    out = tmp_path / "out"
    out.mkdir()  # an existing, empty output_dir stays empty
    for args in (sft_args(weightless, data, out), ppo_args(weightless, data, out),
                 reward_args(tiny_reward_dir, data, out)):
        code, stdout, err, seconds = dry_run(args, capsys)
        assert code == 0, err
        assert "fits:" in stdout and "base weights" in stdout and seconds < 15, (stdout, seconds)
        assert list(out.iterdir()) == []


def test_plan_of_a_pipeline_prints_a_plan_per_stage(tiny_lm_dir, tiny_reward_dir, tmp_path, capsys, no_weights):
    out = tmp_path / "quick"
    args = ["plan", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"output_dir={out}",
            *tiny_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path), "--processes", "2"]
    assert main(args) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    blocks = stdout.split("\n\n")
    assert [block.splitlines()[0].split()[0] for block in blocks[:5]] == \
        ["[sft]", "[preferences]", "[reward]", "[ppo]", "[eval]"]
    assert all("fits: " in block for block in blocks[:5]), stdout
    assert "[sft] 2 processes, ddp" in stdout and "runs as one process" in stdout  # eval and preferences
    assert "scorer 'proxy': its own model" in stdout  # PPO's reward: the reward stage's model, not yet trained
    assert not out.exists()

    # the same reward model as a LoRA adapter on the SFT model's base: PPO holds its adapter alone
    one_base = [*args, f"reward.model.name_or_path={tiny_lm_dir}", "reward.lora_enabled=true"]
    assert main(one_base) == 0, capsys.readouterr().err
    assert "reward 'proxy': adapter on the policy's base" in capsys.readouterr().out


def test_plan_tells_the_stage_by_the_config_name_or_asks(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("{}\n")
    assert main(["plan", "--config", str(tmp_path / "mine.yaml")]) == 2
    assert "add --stage" in capsys.readouterr().err
    assert main(["plan", "--stage", "sft", "--device", "lots"]) == 2
    assert "--device lots: expected cpu, cuda or a GPU's memory in GiB" in capsys.readouterr().err


def test_plan_json_holds_each_stage_s_parts_peak_and_workload(tiny_lm_dir, data, tmp_path, capsys, no_weights):
    path = tmp_path / "plan.json"
    args = sft_args(tiny_lm_dir, data, tmp_path / "out")
    assert main(["plan", "--stage", *args, "--device", "cpu", "--processes", "2", "--json", str(path)]) == 0
    peak = capsys.readouterr().out.split("peak: always + the larger of forward and generate")[1].split()[0]
    saved = json.loads(path.read_text())
    assert (saved["device_kind"], saved["processes"], saved["strategy"]) == ("cpu", 2, "ddp")
    stage, = saved["stages"]
    assert stage["stage"] == "sft" and stage["problems"] == []
    parts = {part["key"]: part for part in stage["parts"]}
    assert {"runtime", "weights", "adapter", "optimizer", "gradients", "ddp_buckets", "activations"} <= set(parts)
    phase = {name: sum(p["mib"] for p in stage["parts"] if p["phase"] == name) for name in ("always", "forward",
                                                                                              "generate")}
    assert stage["peak_mib"] == pytest.approx(phase["always"] + max(phase["forward"], phase["generate"]))
    assert f"{stage['peak_mib']:,.0f}" == peak  # the printed plan's peak
    workload = stage["workload"]
    assert workload["model"]["layers"] == 2 and workload["processes"] == 2 and workload["rows"] == 4
    rebuilt = memory.Workload(**{**workload, "model": memory.ModelShape(**workload["model"])})
    assert memory.peak(memory.parts(rebuilt)) / memory.MIB == pytest.approx(stage["peak_mib"])

    # a plan with problems still writes them, then exits 2
    assert main(["plan", "--stage", *sft_args(tiny_lm_dir, data, tmp_path / "out", "lora.target_modules=[nope]"),
                 "--json", str(path)]) == 2
    stage, = json.loads(path.read_text())["stages"]
    assert "lora.target_modules" in stage["problems"][0] and "peak_mib" not in stage


def test_a_stages_peak_rss_is_its_own_not_the_process_that_started_it():
    """plan_memory.py sets plans against metrics.json's peak_rss_mb of stages it starts: ru_maxrss after exec also
    counts the process it was started from (here one holding 1 GiB more), VmHWM only the stage's own."""
    import subprocess
    import sys

    held = torch.ones(2**28)  # 1 GiB of float32, every page written
    child = subprocess.run([sys.executable, "-c", "from rlft.runs import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    from rlft.runs import peak_rss_mb

    assert peak_rss_mb() > 1024 + float(child.stdout) and float(child.stdout) < 1024
    del held
