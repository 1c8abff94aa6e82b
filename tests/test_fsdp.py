"""PPO with the base sharded by FSDP2 (FULL_SHARD) across 2 CPU processes, through `accelerate launch`.

FSDP changes where the weights live, not what is computed: the same seeds give the same samples and the
same updates as DDP (which holds the whole base in every process), to float tolerance, with half the
parameter storage per process; resume continues exactly; all four roles (policy, reference, reward
adapter, adapter critic) run on the one sharded base. (A fixed rollout's update split over 2 FSDP
processes equals 1 process: tests/test_ppo.py, beside the DDP cases.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_one_base import reward_dir, sft_dir  # noqa: F401 (fixtures)
from tests.test_ppo import DDP_CPU, FSDP, TINY, history, prompts_file  # noqa: F401 (prompts_file: fixture)

ROOT = Path(__file__).parents[1]
# Reduce-scatter (FSDP) and all-reduce (DDP) sum the same gradients in different orders: equal to ~1e-7.
COMPARED = ("objective/scores", "objective/kl", "objective/kl_coef", "loss/policy", "loss/value",
            "policy/grad_norm", "response/length")


def launch(accelerate_config, *args, processes=2):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
               "--num_processes", str(processes), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def ppo(accelerate_config, tiny_lm_dir, prompts, out, *overrides):
    launch(accelerate_config, "-m", "rlft", "ppo", "--config", TINY, f"output_dir={out}",
           f"model.name_or_path={tiny_lm_dir}", f"data.path={prompts}",
           "reward=[{kind: function, path: 'tests.test_ppo:share_of_target'}]", *overrides)


def assert_same_history(a, b, keys=COMPARED, rel=1e-5):
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-6), (x["step"], key)


def test_ppo_under_fsdp_equals_ddp_with_half_the_parameters_and_resumes_exactly(tiny_lm_dir, prompts_file,
                                                                                 tmp_path):
    ppo(DDP_CPU, tiny_lm_dir, prompts_file, tmp_path / "ddp", "ppo.steps=3")
    ppo(FSDP, tiny_lm_dir, prompts_file, tmp_path / "fsdp", "ppo.steps=3")
    ddp, fsdp = history(tmp_path / "ddp"), history(tmp_path / "fsdp")
    for kind in ("ddp", "fsdp"):  # two processes really ran: each saved its own RNG state
        assert sorted(p.name for p in (tmp_path / kind / "checkpoints" / "step-000003").glob("rng_state_*")) == [
            "rng_state_0.json", "rng_state_1.json"]
    assert fsdp[0]["objective/kl"] == 0.0  # the reference is the same sharded weights, adapter off
    assert fsdp[-1]["objective/kl"] != 0.0  # ... and the policy did move
    assert_same_history(fsdp, ddp)
    # each process holds half of the base (+ its adapter and head) instead of all of it
    summary = {kind: json.loads((tmp_path / kind / "metrics.json").read_text()) for kind in ("ddp", "fsdp")}
    assert summary["fsdp"]["parameters_mb"] < 0.55 * summary["ddp"]["parameters_mb"]
    # the adapter gathered whole from the shards is the DDP run's adapter
    from safetensors.torch import load_file

    saved = {kind: load_file(tmp_path / kind / "policy" / "adapter_model.safetensors") for kind in ("ddp", "fsdp")}
    assert saved["fsdp"].keys() == saved["ddp"].keys()
    for name in saved["ddp"]:
        torch.testing.assert_close(saved["fsdp"][name], saved["ddp"][name], atol=1e-6, rtol=1e-5)

    # generating on the whole gathered policy instead of layer by layer changes nothing but the time
    ppo(FSDP, tiny_lm_dir, prompts_file, tmp_path / "whole", "ppo.steps=3", "ppo.gather_for_generation=true")
    assert_same_history(history(tmp_path / "whole"), ddp)

    # interrupted after step 1, resumed to 3: optimizer state (sharded, saved whole), RNG and adapter restored
    ppo(FSDP, tiny_lm_dir, prompts_file, tmp_path / "resumed", "ppo.steps=1")
    ppo(FSDP, tiny_lm_dir, prompts_file, tmp_path / "resumed", "ppo.steps=3")
    assert_same_history(history(tmp_path / "resumed"), fsdp, rel=1e-6)


def test_four_roles_on_one_sharded_base_equal_ddp(tiny_lm_dir, sft_dir, reward_dir, prompts_file,  # noqa: F811
                                                   tmp_path):
    """Policy, reference, reward adapter and adapter critic on the one base, sharded: as under DDP."""
    overrides = (f"sft_adapter={sft_dir}", f"reward=[{{kind: adapter, path: '{reward_dir}', normalize: true}}]",
                 "ppo.critic=adapter", "ppo.steps=2")
    ppo(DDP_CPU, tiny_lm_dir, prompts_file, tmp_path / "ddp", *overrides)
    ppo(FSDP, tiny_lm_dir, prompts_file, tmp_path / "fsdp", *overrides)
    fsdp = history(tmp_path / "fsdp")
    assert fsdp[0]["objective/kl"] == 0.0
    assert_same_history(fsdp, history(tmp_path / "ddp"), keys=(*COMPARED, "val/grad_norm", "val/explained_variance"))
    assert (tmp_path / "fsdp" / "policy" / "critic" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------
# sft and reward: HF's Trainer on the FSDP2 path accelerate gives it (rlft.distributed.fsdp_on_cpu on CPU)

def trainer_losses(out):
    """The training losses the Trainer logged, from its last checkpoint."""
    last = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def interrupt_after_second_to_last_checkpoint(straight, copy):
    """The folder a run leaves when killed right after its second-to-last checkpoint: that checkpoint complete,
    nothing after it (the last checkpoint, the final adapter and metrics.json) written."""
    import shutil

    shutil.copytree(straight, copy)
    checkpoints = sorted((copy / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    shutil.rmtree(checkpoints[-1])
    for name in ("metrics.json", "adapter_model.safetensors", "model.safetensors"):
        (copy / name).unlink(missing_ok=True)
    return checkpoints[-2].name


def adapter_weights(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_trainer_stages_under_fsdp_equal_one_process_and_resume_exactly(stage, tiny_lm_dir, tmp_path):
    """2 processes x 4 rows under FSDP take the steps of 1 process x 8 rows; resumed, they end exactly where an
    uninterrupted run ends. The reward model is a LoRA adapter + score head on the tiny Llama."""
    from rlft.cli import main
    from tests.test_reward import write_marker_pairs
    from tests.test_sft import ROWS, write_jsonl

    if stage == "sft":
        data = write_jsonl(tmp_path / "sft.jsonl", [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in ROWS])
        extra = ("data.eval_fraction=0.25",)
        before, after = "eval_loss_before", "eval_loss_after"
    else:
        # distinct prompts: 48 training pairs, whole global batches of 8 (a ragged last one splits unevenly)
        data = write_marker_pairs(tmp_path / "pairs.jsonl", 64, numbered=True)
        extra = ("lora_enabled=true", "lora.r=4", "lora.alpha=8")
        before, after = "eval_accuracy_before", "eval_accuracy_after"
    args = lambda out, *more: [stage, "--config", TINY.parent / f"{stage}.yaml", f"output_dir={out}",  # noqa: E731
                               f"model.name_or_path={tiny_lm_dir}", f"data.path={data}", *extra, *more]

    launch(FSDP, "-m", "rlft", *args(tmp_path / "fsdp", "train.batch_size=4"))
    assert main(list(map(str, args(tmp_path / "one", "train.batch_size=8")))) == 0
    fsdp, one = (json.loads((tmp_path / kind / "metrics.json").read_text()) for kind in ("fsdp", "one"))
    assert fsdp["steps"] == one["steps"] == 8
    assert trainer_losses(tmp_path / "fsdp") == pytest.approx(trainer_losses(tmp_path / "one"), rel=1e-4)
    for name, value in adapter_weights(tmp_path / "one").items():  # gathered whole from the shards
        torch.testing.assert_close(adapter_weights(tmp_path / "fsdp")[name], value, atol=1e-5, rtol=1e-4, msg=name)
    # Held-out figures: the same pairs or rows, but the eval loss averages per-process batch means (HF's rule)
    assert fsdp[after] == pytest.approx(one[after], abs=0.01)
    assert fsdp[after] != fsdp[before]

    resumed_from = interrupt_after_second_to_last_checkpoint(tmp_path / "fsdp", tmp_path / "resumed")
    launch(FSDP, "-m", "rlft", *args(tmp_path / "resumed", "train.batch_size=4"))
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed_from == "checkpoint-7" and resumed[after] == pytest.approx(fsdp[after], rel=1e-6)
    for name, value in adapter_weights(tmp_path / "fsdp").items():
        torch.testing.assert_close(adapter_weights(tmp_path / "resumed")[name], value, atol=1e-7, rtol=1e-6, msg=name)
