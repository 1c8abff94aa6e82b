"""Faults a user meets: bad input (one line, exit 2, nothing lost), kills mid-run and mid-save, full disks,
a second run in the same folder, and files crafted to run code."""

import errno
import importlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlft.cli import main
from rlft.runs import LOCK

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SCORER = "reward=[{kind: function, path: 'tests.test_ppo:share_of_target'}]"


def boom(prompts, completions):
    raise ValueError("the judge service is down")


def quits(prompts, completions):
    sys.exit(3)


def hangs(prompts, completions):
    time.sleep(60)
    return [0.0] * len(completions)


def sft_args(lm, data, out, *extra):
    return ["sft", "--config", str(TINY / "sft.yaml"), f"output_dir={out}", f"model.name_or_path={lm}",
            f"data.path={data / 'sft.jsonl'}", *extra]


def reward_args(rm, data, out, *extra):
    return ["reward", "--config", str(TINY / "reward.yaml"), f"output_dir={out}", f"model.name_or_path={rm}",
            f"data.path={data / 'pairs.jsonl'}", *extra]


def dpo_args(lm, data, out, *extra):
    return ["dpo", "--config", str(TINY / "dpo.yaml"), f"output_dir={out}", f"model.name_or_path={lm}",
            f"data.path={data / 'pairs.jsonl'}", *extra]


def ppo_args(lm, data, out, *extra):
    return ["ppo", "--config", str(TINY / "ppo.yaml"), f"output_dir={out}", f"model.name_or_path={lm}",
            f"data.path={data / 'prompts.jsonl'}", SCORER, *extra]


def snapshot(folder: Path) -> dict:
    """Every file's bytes, but the lock's (it names the latest holder)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK}


def error_line(capsys, stage: str) -> str:
    """The run's stderr has exactly one error line, last, and no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and not any("Traceback" in line for line in err), "\n".join(err[-20:])
    assert [line for line in err if line.startswith(f"rlft {stage}: error:")] == err[-1:], "\n".join(err[-5:])
    return err[-1]


@pytest.fixture
def mount_tmpfs(tmp_path):
    """A small filesystem of our own (full disks, read-only disks); needs root, as CI and this machine have."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)])


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, and what the output folder held before is untouched


def write_bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("a text file, not data")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'
                                        '{"prompt": "e", completion: f}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "columns.jsonl").write_text('{"question": "a", "answer": "b"}\n' * 4)
    (tmp_path / "broken.yaml").write_text("train:\n  max_steps: [1, 2\nlora:\n  r: 4\n")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "nulls.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": null, "completion": "b"}\n' * 2)
    (tmp_path / "blank.jsonl").write_text('{"prompt": ""}\n' * 4)
    (tmp_path / "no_messages.jsonl").write_text('{"messages": []}\n' * 4)
    (tmp_path / "numbers.jsonl").write_text("".join(f'{{"prompt": {i}, "completion": "b"}}\n' for i in range(4)))
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "café", "completion": "olé"}\n'.encode("latin-1") * 4)
    (tmp_path / "no_content.jsonl").write_text('{"prompt": [{"role": "user"}], "completion": "b"}\n' * 4)
    (tmp_path / "long_prompts.jsonl").write_text(('{"prompt": "' + "hello " * 252 + '"}\n') * 4)
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "failed_reward").mkdir()  # what a killed `rlft reward` leaves: its config, no weights
    (tmp_path / "failed_reward" / "config.yaml").write_text("seed: 0\n")


def bad_inputs(tmp_path, lm, rm, data):
    """name -> (CLI args, the words the one line must contain)."""
    out = str(tmp_path / "out")
    return {
        "missing data file": (sft_args(lm, data, out, "data.path=nope.jsonl"), "data file 'nope.jsonl' not found"),
        "text file as data": (sft_args(lm, data, out, f"data.path={tmp_path / 'notes.txt'}"), "'.txt', which rlft does not read"),
        "malformed JSONL": (sft_args(lm, data, out, f"data.path={tmp_path / 'bad.jsonl'}"), "line 3 is not valid JSON"),
        "empty data": (sft_args(lm, data, out, f"data.path={tmp_path / 'empty.jsonl'}"), "is empty"),
        "wrong columns": (sft_args(lm, data, out, f"data.path={tmp_path / 'columns.jsonl'}"), "has columns ['answer', 'question']"),
        "hub dataset offline": (sft_args(lm, data, out, "data.path=trl-lib/Capybara"),
                                "dataset 'trl-lib/Capybara' not found: not a local file or folder"),
        "null prompt": (sft_args(lm, data, out, f"data.path={tmp_path / 'nulls.jsonl'}"), "row 1 has a null `prompt`: drop or fill such rows"),
        "empty prompts": (ppo_args(lm, data, out, f"data.path={tmp_path / 'blank.jsonl'}"), "every `prompt` in"),
        "empty messages": (ppo_args(lm, data, out, f"data.path={tmp_path / 'no_messages.jsonl'}"),
                           "row 0 has an empty `messages`"),
        "unknown model": (sft_args(lm, data, out, "model.name_or_path=nobody/no-such-model"), "model 'nobody/no-such-model' not found"),
        "unknown key": (sft_args(lm, data, out, "lora.rr=8"), "did you mean 'lora.r'"),
        "bad value": (sft_args(lm, data, out, "lora.r=0"), "bad value for 'lora.r'"),
        "infinite number": (sft_args(lm, data, out, "train.learning_rate=.inf"), "must be a finite number"),
        "override not YAML": (ppo_args(lm, data, out, "reward=[{kind: function, path: x:y"), "is not valid YAML"),
        "config YAML syntax": (["sft", "--config", str(tmp_path / "broken.yaml"), f"output_dir={out}"], "line 3, column"),
        "output_dir is a file": (sft_args(lm, data, tmp_path / "a_file"), "is a file, not a folder"),
        "output_dir under /proc": (sft_args(lm, data, "/proc/rlft-run"), "cannot write to output_dir '/proc/rlft-run'"),
        "output_dir under /sys": (sft_args(lm, data, "/sys/rlft-run"), "cannot write to output_dir '/sys/rlft-run'"),
        "scorer raises": (ppo_args(lm, data, out, "reward=[{kind: function, path: 'tests.test_faults:boom'}]"),
                          "scorer 'boom' raised ValueError: the judge service is down"),
        "diverging learning rate": (ppo_args(lm, data, out, "ppo.learning_rate=1e6", "ppo.max_kl=1e9"), "NaN/inf"),
        "missing reward data": (reward_args(rm, data, out, "data.path=nope.jsonl"), "data file 'nope.jsonl' not found"),
        "empty output_dir": (sft_args(lm, data, ""), "output_dir is empty"),
        "reward model folder empty": (ppo_args(lm, data, out, f"reward=[{{kind: model, path: {tmp_path / 'empty_model'}}}]"),
                                      "holds no model weights"),
        "reward run that never finished": (ppo_args(lm, data, out,
                                                    f"reward=[{{kind: model, path: {tmp_path / 'failed_reward'}}}]"),
                                           "holds no model weights"),
        "prompts past the context": (ppo_args(lm, data, out, f"data.path={tmp_path / 'long_prompts.jsonl'}",
                                              "sampling.max_prompt_length=300"),
                                     "plus sampling.max_new_tokens=6 are longer than the model's context (256 tokens)"),
        "preference prompts past the context": (["preferences", f"model.name_or_path={lm}", f"output_dir={out}",
                                                 f"data.path={tmp_path / 'long_prompts.jsonl'}",
                                                 "sampling.max_prompt_length=300", "sampling.max_new_tokens=6"],
                                                "plus sampling.max_new_tokens=6 are longer than the model's context"),
        "prompts that are numbers": (sft_args(lm, data, out, f"data.path={tmp_path / 'numbers.jsonl'}"),
                                     "row 0 has a int `prompt` (0), not text or a message list"),
        "Latin-1 data file": (sft_args(lm, data, out, f"data.path={tmp_path / 'latin1.jsonl'}"),
                              "is not UTF-8 text (byte 0xe9 at offset 15)"),
        "message without content": (sft_args(lm, data, out, f"data.path={tmp_path / 'no_content.jsonl'}"),
                                    "lacks a text `role` or `content`"),
        "negative seed": (sft_args(lm, data, out, "seed=-1"), "bad value for 'seed': must be in [0, 2**32)"),
        "LoRA rank past the layers": (sft_args(lm, data, out, f"lora.r={10**12}"), "is above the rank of every linear"),
        "unknown scheduler": (sft_args(lm, data, out, "train.lr_scheduler=cosin"), "did you mean 'cosine'"),
        "unknown attention": (sft_args(lm, data, out, "model.attn_implementation=bogus"),
                              "bad value for 'model.attn_implementation'"),
        "broken chat template": (sft_args(lm, data, out, "model.chat_template='{% for m in messages %}'"),
                                 "bad value for 'model.chat_template': not a valid Jinja template"),
        "negative max_grad_norm": (ppo_args(lm, data, out, "ppo.max_grad_norm=-1"), "bad value for 'ppo.max_grad_norm'"),
        "zero max_grad_norm": (ppo_args(lm, data, out, "ppo.max_grad_norm=0"), "bad value for 'ppo.max_grad_norm'"),
        "negative weight_decay": (ppo_args(lm, data, out, "ppo.weight_decay=-0.1"), "bad value for 'ppo.weight_decay'"),
        "negative value_loss_coef": (ppo_args(lm, data, out, "ppo.value_loss_coef=-1"),
                                     "bad value for 'ppo.value_loss_coef'"),
        "negative entropy_coef": (ppo_args(lm, data, out, "ppo.entropy_coef=-0.1"), "bad value for 'ppo.entropy_coef'"),
        "negative sft weight_decay": (sft_args(lm, data, out, "train.weight_decay=-1"),
                                      "bad value for 'train.weight_decay'"),
        "scorer calls sys.exit": (ppo_args(lm, data, out, "reward=[{kind: function, path: 'tests.test_faults:quits'}]"),
                                  "scorer 'quits' raised SystemExit: 3"),
        "scorer hangs": (ppo_args(lm, data, out,
                                  "reward=[{kind: function, path: 'tests.test_faults:hangs', timeout: 1}]"),
                         "scorer 'hangs' took longer than its timeout of 1 s"),
    }


CASES = list(bad_inputs(Path("/nonexistent"), "lm", "rm", Path("/nonexistent")))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, tiny_lm_dir, tiny_reward_dir, data, tmp_path, capsys):
    write_bad_files(tmp_path)
    args, message = bad_inputs(tmp_path, tiny_lm_dir, tiny_reward_dir, data)[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("results of an earlier run")
    before = snapshot(tmp_path)
    assert main(args) == 2
    assert message in error_line(capsys, args[0])
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that was there changed


# ---------------------------------------------------------------------------------------------------
# rlft's own files, damaged: one line naming the file and the way out, and nothing written


@pytest.fixture(scope="module")
def finished(tiny_lm_dir, tiny_reward_dir, data, tmp_path_factory):
    """Finished tiny runs to damage copies of: sft (checkpoints 1 and 2), a reward model, PPO (steps 1 and 2)."""
    root = tmp_path_factory.mktemp("finished")
    assert main(sft_args(tiny_lm_dir, data, root / "sft", "train.max_steps=2")) == 0
    assert main(reward_args(tiny_reward_dir, data, root / "reward", "train.max_steps=2")) == 0
    assert main(ppo_args(tiny_lm_dir, data, root / "ppo", "ppo.steps=2")) == 0
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def huge_header(path: Path) -> None:
    """A safetensors file whose header claims 2^40 bytes: what a crafted or corrupted download looks like."""
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")


def write(text: str):
    return lambda path: path.write_text(text)


def pickled_marker(marker: Path):
    import torch

    return lambda path: torch.save({"state": WritesMarker(marker)}, path)


def saved_by_two_processes(path: Path) -> None:
    """trainer_state.pt as a two-process run saves it: beside it only rank 0's RNG (rank 1's lost)."""
    import torch

    torch.save({**torch.load(path, weights_only=True), "processes": 2}, path)


def one_tensor_fewer(path: Path) -> None:
    """An adapter saved for another layout (an older rlft left an MoE's fused experts out): a tensor fewer."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    save_file(dict(sorted(weights.items())[1:]), path, metadata={"format": "pt"})


def damaged_cases(tmp, lm, rm, data):
    """name -> (folder copied from `finished`, file damaged in it, damage, CLI args, words of the one line)."""
    eval_sft = ["eval", f"output_dir={tmp / 'eval'}", f"policies=[{tmp / 'sft'}]", f"data.path={data / 'prompts.jsonl'}",
                "num_prompts=2", "sampling.max_new_tokens=2",
                "scorers=[{name: proxy, kind: function, path: 'tests.test_ppo:share_of_target'}]"]
    ppo_on_reward = ppo_args(lm, data, tmp / "ppo", "ppo.steps=1",
                             f"reward=[{{kind: model, path: {tmp / 'reward'}, normalize: true}}]")
    resume_sft = sft_args(lm, data, tmp / "sft", "train.max_steps=3")
    resume_ppo = ppo_args(lm, data, tmp / "ppo", "ppo.steps=3")
    checkpoint, step = "checkpoints/checkpoint-2", "checkpoints/step-000002"
    unlink = lambda path: path.unlink()  # noqa: E731
    cannot = "so it cannot continue the run exactly: delete it to resume from the one before, or set resume=false"
    return {
        "adapter cut short": ("sft", "adapter_model.safetensors", truncate, eval_sft, "is damaged (SafetensorError"),
        "adapter_config.json not JSON": ("sft", "adapter_config.json", write("{"), eval_sft, "is damaged (JSONDecodeError"),
        "rlft_adapter.json not JSON": ("sft", "rlft_adapter.json", write("{"), eval_sft, "rlft_adapter.json' is damaged"),
        "reward model header too large": ("reward", "model.safetensors", huge_header, ppo_on_reward,
                                          "is damaged (SafetensorError"),
        "normalization.json not JSON": ("reward", "normalization.json", write('{"mean": 0.1, "std"'), ppo_on_reward,
                                        "normalization.json' is damaged (JSONDecodeError"),
        "normalization.json empty object": ("reward", "normalization.json", write("{}"), ppo_on_reward,
                                            "normalization.json' is damaged (mean None, std None"),
        "normalization.json negative std": ("reward", "normalization.json", write('{"mean": 0.0, "std": -2.0}'),
                                            ppo_on_reward, "needs a finite mean and a positive std"),
        "eval_before.json not JSON": ("sft", "eval_before.json", write("{"), resume_sft, "eval_before.json' is damaged"),
        "trainer_state.json not JSON": ("sft", f"{checkpoint}/trainer_state.json", write("{"), resume_sft,
                                        "trainer_state.json' is damaged (JSONDecodeError"),
        "scheduler.pt cut short": ("sft", f"{checkpoint}/scheduler.pt", truncate, resume_sft,
                                   "scheduler.pt' is damaged (a torch file cut short"),
        "optimizer.pt missing": ("sft", f"{checkpoint}/optimizer.pt", unlink, resume_sft,
                                 "has no optimizer.pt or optimizer.bin or optimizer_0, so it cannot continue the run exactly"),
        "PPO trainer_state.pt missing": ("ppo", f"{step}/trainer_state.pt", unlink, resume_ppo,
                                         f"step-000002' has no trainer_state.pt, {cannot}"),
        "PPO rng_state_0.json missing": ("ppo", f"{step}/rng_state_0.json", unlink, resume_ppo,
                                         f"step-000002' has no rng_state_0.json, {cannot}"),
        "PPO rng_state of rank 1 missing": ("ppo", f"{step}/trainer_state.pt", saved_by_two_processes, resume_ppo,
                                            f"step-000002' has no rng_state_1.json, {cannot}"),
        "PPO value_head.pt missing": ("ppo", f"{step}/value_head.pt", unlink, resume_ppo,
                                      f"step-000002' has no value_head.pt, {cannot}"),
        "PPO adapter of another layout": ("ppo", f"{step}/policy/adapter_model.safetensors", one_tensor_fewer,
                                          resume_ppo, "has no weights for 1 of the policy adapter's tensors"),
        "crafted rng_state.pth": ("sft", f"{checkpoint}/rng_state.pth", pickled_marker(tmp / "pwned"), resume_sft,
                                  "holds objects other than tensors and numbers, refused unread"),
        "config.yaml not YAML": ("sft", "config.yaml", write("lora: {r: 4\n"), resume_sft, "config.yaml' is damaged"),
        "config.yaml a list": ("sft", "config.yaml", write("- 1\n- 2\n"), resume_sft, "is damaged (a YAML list"),
        "pipeline.json not JSON": (None, "pipeline.json", write("{"),
                                   ["pipeline", f"output_dir={tmp / 'pipe'}", "stages=[]"], "pipeline.json' is damaged"),
    }


DAMAGED = list(damaged_cases(Path("/x"), "lm", "rm", Path("/x")))


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_file_of_rlft_is_one_line_and_changes_nothing(case, finished, tiny_lm_dir, tiny_reward_dir, data,
                                                                 tmp_path, capsys):
    source, name, damage, args, words = damaged_cases(tmp_path, tiny_lm_dir, tiny_reward_dir, data)[case]
    folder = tmp_path / (source or "pipe")
    if source:
        shutil.copytree(finished / source, folder)
    else:
        folder.mkdir()
    damage(folder / name) if (folder / name).exists() or source is None else pytest.fail(f"{name} not in {source}")
    before = snapshot(tmp_path)
    assert main(args) == 2
    line = error_line(capsys, args[0])
    assert words in line, line
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not (tmp_path / "pwned").exists()


def test_a_ppo_checkpoint_cut_short_by_a_kill_is_skipped(finished, tiny_lm_dir, data, tmp_path, caplog):
    """A kill mid-save leaves a hidden staging folder (a checkpoint is renamed into place whole): not a checkpoint
    to refuse, the rerun resumes from the newest step folder beside it."""
    shutil.copytree(finished / "ppo", tmp_path / "ppo")
    staging = tmp_path / "ppo" / "checkpoints" / ".staging-step-000003"
    staging.mkdir()
    (staging / "rng_state_0.json").write_text('{"torch": [')
    with caplog.at_level(logging.INFO, logger="rlft.ppo.train"):
        assert main(ppo_args(tiny_lm_dir, data, tmp_path / "ppo", "ppo.steps=3")) == 0
    assert "step-000002 (step 2)" in caplog.text


def test_a_downloaded_adapter_record_chooses_no_kernel(finished, data, tmp_path, capsys):
    """An adapter's rlft_adapter.json names the weights and the chat template it was trained with; the attention
    kernel (a hub kernel to fetch, here) and checkpointing are the user's to choose: eval ignores them."""
    folder = tmp_path / "sft"
    shutil.copytree(finished / "sft", folder)
    info = json.loads((folder / "rlft_adapter.json").read_text())
    info["base_model"].update(attn_implementation="kernels-community/flash-attn3", gradient_checkpointing=True)
    (folder / "rlft_adapter.json").write_text(json.dumps(info))
    assert main(["eval", f"output_dir={tmp_path / 'eval'}", f"policies=[{folder}]", f"data.path={data / 'prompts.jsonl'}",
                 "num_prompts=2", "sampling.max_new_tokens=2",
                 "scorers=[{name: proxy, kind: function, path: 'tests.test_ppo:share_of_target'}]"]) == 0, \
        capsys.readouterr().err[-2000:]


def test_resume_with_a_changed_config_is_refused_and_the_run_kept(tiny_lm_dir, data, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert main(ppo_args(tiny_lm_dir, data, out, "ppo.steps=2")) == 0
    before = snapshot(out)
    assert main(ppo_args(tiny_lm_dir, data, out, "ppo.steps=3", "lora.r=8", "ppo.learning_rate=1e-3")) == 2
    line = error_line(capsys, "ppo")
    assert "lora.r: 4 -> 8" in line and "ppo.learning_rate: 0.003 -> 0.001" in line and "ppo.steps" not in line
    assert snapshot(out) == before
    assert main(ppo_args(tiny_lm_dir, data, out, "ppo.steps=3")) == 0  # a longer run is the same experiment
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_folder_belongs_to_the_stage_that_made_it(tiny_lm_dir, data, tmp_path, capsys):
    """Another stage's run in a finished run's folder, or in a folder inside it, is refused and changes nothing:
    eval into a PPO run, PPO into its own SFT adapter's folder, SFT into a PPO run's policy/."""
    sft, ppo = tmp_path / "sft", tmp_path / "ppo"
    assert main(sft_args(tiny_lm_dir, data, sft, "train.max_steps=1")) == 0
    assert main(ppo_args(tiny_lm_dir, data, ppo, "ppo.steps=2", f"sft_adapter={sft}")) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main(["eval", f"output_dir={ppo}", f"policies=[{ppo}]", f"data.path={data / 'prompts.jsonl'}",
                 "scorers=[{name: proxy, kind: function, path: 'tests.test_ppo:share_of_target'}]"]) == 2
    assert f"output_dir '{ppo}' holds an `rlft ppo` run, which `rlft eval` may not overwrite" in error_line(capsys, "eval")
    assert main(ppo_args(tiny_lm_dir, data, sft, "ppo.steps=2", f"sft_adapter={sft}")) == 2
    assert f"output_dir '{sft}' holds an `rlft sft` run, which `rlft ppo` may not overwrite" in error_line(capsys, "ppo")
    assert main(sft_args(tiny_lm_dir, data, ppo / "policy", "train.max_steps=1")) == 2
    assert f"is inside the `rlft ppo` run '{ppo.resolve()}'" in error_line(capsys, "sft")
    assert snapshot(tmp_path) == before


RESAVED = {
    # stage: (args builder, the module whose final save writes the model card, a short run, the folder that is
    # replaced whole, never rewritten in place)
    "sft": (sft_args, "rlft.sft", "train.max_steps=2", None),
    "reward": (reward_args, "reward_models.train", "train.max_steps=2", None),
    "ppo": (ppo_args, "rlft.ppo.train", "ppo.steps=2", "policy"),
}


@pytest.mark.parametrize("stage", list(RESAVED))
def test_a_rerun_over_a_finished_run_unmarks_it_before_rewriting(stage, tiny_lm_dir, tiny_reward_dir, data, tmp_path,
                                                                 capsys, monkeypatch):
    """A rerun that dies (the disk full) while re-saving a finished stage's files must not leave the old completion
    mark beside half-written ones: the mark goes first, and the next rerun finishes the stage again. PPO's policy/
    is replaced whole: the old one stays until the new one is complete."""
    build, module, short, whole = RESAVED[stage]
    out = tmp_path / stage
    args = build(tiny_reward_dir if stage == "reward" else tiny_lm_dir, data, out, short)
    assert main(args) == 0
    assert (out / "metrics.json").is_file()
    kept = snapshot(out / whole) if whole else None

    def torn(folder, **card):  # the last file of every stage's final save
        (Path(folder) / "README.md").write_text("half a model ca")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(importlib.import_module(module), "write_model_card", torn)
    assert main(args) == 2
    assert "No space left on device" in error_line(capsys, stage)
    assert not (out / "metrics.json").exists()  # no finished run is claimed beside the torn card
    if whole:
        assert snapshot(out / whole) == kept
    monkeypatch.undo()
    assert main(args) == 0
    assert (out / "metrics.json").is_file()
    assert "half a model ca" not in (out / (whole or ".") / "README.md").read_text()


def test_a_rerun_over_finished_preferences_keeps_the_old_pairs_whole(tiny_lm_dir, data, mount_tmpfs, capsys):
    """A rerun that writes more pairs than the disk has room for: the old pairs.jsonl stays whole (it is replaced,
    never rewritten in place), the stage is no longer marked complete, and with room freed the rerun finishes."""
    disk = mount_tmpfs("disk", "size=1m")
    out = disk / "preferences"
    args = ["preferences", f"output_dir={out}", f"model.name_or_path={tiny_lm_dir}",
            f"data.path={data / 'prompts.jsonl'}", "num_samples=4", "sampling.max_new_tokens=6",
            "judge=[{kind: function, path: 'tests.test_pipeline:positivity'}]"]
    assert main(args) == 0
    pairs = (out / "pairs.jsonl").read_bytes()
    filler = disk / "filler"
    # 16 KiB left: room for the config, not for every pair of the rerun (about 44 KiB; the first run's are 12)
    filler.write_bytes(bytes(shutil.disk_usage(disk).free - 16 * 1024))
    capsys.readouterr()
    assert main([*args, "pairs=all"]) == 2
    line = error_line(capsys, "preferences")
    assert "No space left on device" in line and line.endswith("it starts over")  # it keeps no checkpoints
    assert not (out / "metrics.json").exists()
    assert (out / "pairs.jsonl").read_bytes() == pairs
    filler.unlink()
    assert main([*args, "pairs=all"]) == 0
    assert (out / "metrics.json").is_file() and len((out / "pairs.jsonl").read_bytes()) > 2 * len(pairs)


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_a_resume_on_other_data_is_refused(stage, tiny_lm_dir, data, tmp_path, capsys):
    """The data file replaced between a run and its rerun: resuming would mix two datasets in one run."""
    name = "sft.jsonl" if stage == "sft" else "prompts.jsonl"
    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    build = {"sft": lambda out, *extra: sft_args(tiny_lm_dir, mine, out, *extra),
             "ppo": lambda out, *extra: ppo_args(tiny_lm_dir, mine, out, *extra)}[stage]
    steps = "train.max_steps" if stage == "sft" else "ppo.steps"
    out = tmp_path / "run"
    assert main(build(out, f"{steps}=2")) == 0
    lines = (mine / name).read_text().splitlines()
    (mine / name).write_text("\n".join(lines[::-1][: len(lines) - 4]) + "\n")  # other rows, fewer of them
    capsys.readouterr()
    before = snapshot(out)
    assert main(build(out, f"{steps}=3")) == 2
    assert "the data changed since this run started" in error_line(capsys, stage)
    assert snapshot(out) == before
    assert main(build(out, f"{steps}=3", "resume=false")) == 0  # starting over on the new data is fine


def test_sft_adapter_of_another_base_is_refused_before_loading(tiny_lm_dir, tiny_lm_dir_64, data, tmp_path, capsys):
    assert main(sft_args(tiny_lm_dir_64, data, tmp_path / "sft", "train.max_steps=1")) == 0
    capsys.readouterr()
    assert main(ppo_args(tiny_lm_dir, data, tmp_path / "ppo", f"sft_adapter={tmp_path / 'sft'}")) == 2
    line = error_line(capsys, "ppo")
    assert f"was trained on base model '{tiny_lm_dir_64}'" in line and f"model.name_or_path={tiny_lm_dir_64}" in line


def test_a_second_run_in_the_same_folder_is_refused(tiny_lm_dir, data, tmp_path, capsys):
    out = tmp_path / "sft"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from rlft import runs; "
                               "runs.lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)", str(out)],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(sft_args(tiny_lm_dir, data, out, "train.max_steps=1")) == 2
        assert f"is in use by another run (pid {holder.pid} on" in error_line(capsys, "sft")
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(sft_args(tiny_lm_dir, data, out, "train.max_steps=1")) == 0  # a killed holder leaves no stale lock


def test_read_only_output_is_one_line(tiny_lm_dir, data, mount_tmpfs, capsys):
    read_only = mount_tmpfs("ro", "ro,size=1m")
    assert main(sft_args(tiny_lm_dir, data, read_only / "sft")) == 2
    assert "Read-only file system" in error_line(capsys, "sft")


def test_full_disk_mid_save_is_one_line_and_a_rerun_resumes(tiny_lm_dir, data, tmp_path, mount_tmpfs, capsys):
    """The disk fills while a checkpoint is written: one line, then, with space freed, the rerun resumes from
    the last whole checkpoint and ends where an uninterrupted run ends."""
    assert main(sft_args(tiny_lm_dir, data, tmp_path / "straight")) == 0
    disk = mount_tmpfs("disk", "size=400k")
    assert main(sft_args(tiny_lm_dir, data, disk / "sft")) == 2
    line = error_line(capsys, "sft")
    assert "the disk of" in line and "is full" in line and "rerun the same command" in line
    assert not (disk / "sft" / "metrics.json").exists()
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    assert main(sft_args(tiny_lm_dir, data, disk / "sft")) == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((disk / "sft" / "metrics.json").read_text())
    assert resumed["eval_loss_after"] == pytest.approx(straight["eval_loss_after"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Real processes, real signals


def start(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlft", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=open(log, "a"), cwd=ROOT)


def kill_when(process: subprocess.Popen, ready, timeout: float = 180) -> bool:
    """SIGKILL `process` the moment `ready()` returns a truthy value; True if it was killed (not finished)."""
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    process.wait()
    return False


def newest_step(folder: Path, pattern: str) -> int:
    steps = [int(p.name.rsplit("-", 1)[1]) for p in folder.glob(pattern)] if folder.is_dir() else []
    return max(steps, default=0)


STAGES = {
    # stage: (args builder, fixture of its model, folder a save is under way in, its metrics to compare)
    "sft": (sft_args, "tiny_lm_dir", "checkpoint-*", ("eval_loss_after", "steps")),
    "reward": (reward_args, "tiny_reward_dir", "checkpoint-*", ("eval_accuracy_after", "normalization", "steps")),
    "ppo": (ppo_args, "tiny_lm_dir", ".staging-step-*", ()),
    "dpo": (dpo_args, "tiny_lm_dir", "checkpoint-*", ("eval_pair_accuracy_after", "eval", "steps")),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_mid_run_and_mid_save_then_rerun_equals_uninterrupted(stage, data, tmp_path, request):
    """Kill the stage three times, each the moment a new checkpoint starts being written (a save under
    way), once more at a random-ish moment, then rerun to the end: it resumes, and ends as an uninterrupted run.
    PPO is compared bit for bit on every logged number; SFT and reward on their final metrics."""
    build, model_fixture, saving, keys = STAGES[stage]
    model = request.getfixturevalue(model_fixture)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert subprocess.run([sys.executable, "-m", "rlft", *build(model, data, straight)], env=ENV, cwd=ROOT,
                          capture_output=True).returncode == 0
    log = tmp_path / "killed.log"
    mid_save = 0
    for target in (2, 4, 6):
        process = start(build(model, data, killed), log)
        assert kill_when(process, lambda: newest_step(killed / "checkpoints", saving) >= target), log.read_text()[-2000:]
        if stage == "ppo":
            mid_save += any((killed / "checkpoints").glob(".staging-step-*"))
        else:
            mid_save += any(not (p / "rlft-complete").exists() for p in (killed / "checkpoints").glob("checkpoint-*"))
    process = start(build(model, data, killed), log)
    time.sleep(4.0)  # somewhere in start-up or training
    kill_when(process, lambda: True)
    assert mid_save >= 1  # at least one kill landed inside a checkpoint write
    final = subprocess.run([sys.executable, "-m", "rlft", *build(model, data, killed)], env=ENV, cwd=ROOT,
                           capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resum" in final.stderr  # it continued a checkpoint: equal results from a fresh start would prove nothing
    if stage == "ppo":
        read = lambda out: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
        a, b = read(straight), read(killed)
        assert [e["step"] for e in b] == list(range(1, 9))
        drop = lambda entry: {k: v for k, v in entry.items() if not k.startswith(("time/", "perf/"))}  # noqa: E731
        assert [drop(e) for e in a] == [drop(e) for e in b]
    else:
        a, b = (json.loads((out / "metrics.json").read_text()) for out in (straight, killed))
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def pipeline_args(lm, rm, data, out):
    from tests.test_pipeline import tiny_overrides

    overrides = [o for o in tiny_overrides(lm, rm, out.parent) if not o.startswith("ppo.ppo.steps")]
    return ["pipeline", f"output_dir={out}", *overrides, "ppo.ppo.steps=400", "ppo.save_every=1"]


SIGNALLED = {
    # name: (args builder, the folder whose newest checkpoint says the run is under way, signal, exit code, reason)
    "ppo SIGTERM": (lambda lm, rm, data, out: ppo_args(lm, data, out, "ppo.steps=400"), "checkpoints", "step-*",
                    signal.SIGTERM, 143, "terminated (SIGTERM)"),
    "ppo Ctrl-C": (lambda lm, rm, data, out: ppo_args(lm, data, out, "ppo.steps=400"), "checkpoints", "step-*",
                   signal.SIGINT, 130, "interrupted"),
    "sft SIGTERM": (lambda lm, rm, data, out: sft_args(lm, data, out, "train.max_steps=2000"), "checkpoints",
                    "checkpoint-*", signal.SIGTERM, 143, "terminated (SIGTERM)"),
    "reward Ctrl-C": (lambda lm, rm, data, out: reward_args(rm, data, out, "train.max_steps=2000"), "checkpoints",
                      "checkpoint-*", signal.SIGINT, 130, "interrupted"),
    "pipeline SIGTERM": (pipeline_args, "ppo/checkpoints", "step-*", signal.SIGTERM, 143, "terminated (SIGTERM)"),
}


@pytest.mark.parametrize("case", list(SIGNALLED))
def test_a_signal_ends_with_the_line_that_the_checkpoints_are_intact(case, tiny_lm_dir, tiny_reward_dir, data,
                                                                     tmp_path):
    """SIGTERM (a scheduler's kill) or Ctrl-C mid-run: the run says where its intact checkpoints are, and that
    line is the last one (no progress bar redrawn after it), with no traceback before it."""
    build, checkpoints, pattern, signum, code, reason = SIGNALLED[case]
    out, log = tmp_path / "run", tmp_path / "log"
    process = start(build(tiny_lm_dir, tiny_reward_dir, data, out), log)
    deadline = time.time() + 180
    while newest_step(out / checkpoints, pattern) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signum)
    assert process.wait(timeout=60) == code, log.read_text()[-2000:]
    time.sleep(0.5)  # anything a stray thread would still draw
    lines = log.read_text().rstrip().splitlines()
    stage = case.split()[0]
    assert lines[-1] == f"rlft {stage}: {reason}; the checkpoints in {out} are intact: rerun the same command to resume"
    assert not any("Traceback" in line for line in lines), "\n".join(lines[-30:])


def test_ctrl_c_reaches_a_run_whose_parent_ignored_and_blocked_it(tiny_reward_dir, data, tmp_path):
    """A launcher may start rlft with SIGINT ignored or blocked (both survive exec, and Python keeps them): Ctrl-C
    must still end the run with its one line."""
    out, log = tmp_path / "run", tmp_path / "log"

    def deaf_to_ctrl_c():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    process = subprocess.Popen([sys.executable, "-m", "rlft", *reward_args(tiny_reward_dir, data, out,
                                                                          "train.max_steps=2000")],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=open(log, "a"), cwd=ROOT,
                               preexec_fn=deaf_to_ctrl_c)
    deadline = time.time() + 180
    while newest_step(out / "checkpoints", "checkpoint-*") < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130, log.read_text()[-2000:]


# ---------------------------------------------------------------------------------------------------
# Files crafted to run code


class WritesMarker:
    """Unpickling this runs `open(path, 'w')`: what a crafted checkpoint would do with a shell command."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_ppo_checkpoint_is_refused_unread(tiny_lm_dir, data, tmp_path, capsys):
    out, marker = tmp_path / "ppo", tmp_path / "pwned"
    assert main(ppo_args(tiny_lm_dir, data, out, "ppo.steps=2")) == 0
    state = out / "checkpoints" / "step-000002" / "trainer_state.pt"
    state.write_bytes(pickle.dumps({"optimizer": WritesMarker(marker)}))
    pickle.loads(state.read_bytes())["optimizer"].close()  # the trap works: plain unpickling writes the marker
    assert marker.exists()
    marker.unlink()
    assert main(ppo_args(tiny_lm_dir, data, out, "ppo.steps=3")) == 2
    assert "holds objects other than tensors and numbers, refused unread" in error_line(capsys, "ppo")
    assert not marker.exists()


def test_a_crafted_sft_checkpoint_is_refused_unread(tiny_lm_dir, data, tmp_path, capsys):
    out, marker = tmp_path / "sft", tmp_path / "pwned"
    assert main(sft_args(tiny_lm_dir, data, out, "train.max_steps=2")) == 0
    import torch

    torch.save({"state": WritesMarker(marker)}, out / "checkpoints" / "checkpoint-2" / "optimizer.pt")
    assert main(sft_args(tiny_lm_dir, data, out, "train.max_steps=3")) == 2
    assert "holds objects other than tensors and numbers, refused unread" in error_line(capsys, "sft")
    assert not marker.exists()


def test_an_adapter_folder_cannot_switch_on_remote_code(tiny_lm_dir, data, tmp_path, capsys):
    """A base whose config maps to its own modeling code, and a downloaded adapter whose record asks for
    trust_remote_code: eval loads it with the built-in class, and the folder's code never runs."""
    from rlft.config import ModelConfig
    from rlft.models import load_model

    base, marker = tmp_path / "base", tmp_path / "pwned"
    shutil.copytree(tiny_lm_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM", "AutoConfig": "evil.EvilConfig"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    assert main(sft_args(base, data, tmp_path / "sft", "train.max_steps=1")) == 0
    info = json.loads((tmp_path / "sft" / "rlft_adapter.json").read_text())
    info["base_model"]["trust_remote_code"] = True  # what a crafted download would say
    (tmp_path / "sft" / "rlft_adapter.json").write_text(json.dumps(info))
    assert main(["eval", f"policies=[{tmp_path / 'sft'}]", f"data.path={data / 'prompts.jsonl'}", "num_prompts=4",
                 "sampling.max_new_tokens=4", f"output_dir={tmp_path / 'eval'}",
                 "scorers=[{name: proxy, kind: function, path: 'tests.test_ppo:share_of_target'}]"]) == 0
    assert (tmp_path / "eval" / "report.json").is_file()
    assert not marker.exists()
    load_model(ModelConfig(name_or_path=str(base), trust_remote_code=True))  # the trap works when trust is given
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------
# The hub unreachable without HF_HUB_OFFLINE, and library warnings


def test_an_unreachable_hub_is_probed_once_not_retried(tmp_path):
    """A closed port stands for the hub: the unknown name fails at once with one line, without the minute of
    huggingface_hub's retries (and their log lines) it took before."""
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    result = subprocess.run([sys.executable, "-m", "rlft", "sft", "model.name_or_path=nobody/no-such-model",
                             f"output_dir={tmp_path / 'out'}"], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert "the hub is unreachable (offline)" in lines[-1]
    assert not any("Retrying" in line or "Traceback" in line for line in lines)
    assert sum("unreachable" in line for line in lines) == 2  # the probe's warning, then the error


def test_library_warnings_print_once():
    code = ("from rlft.cli import setup_logging; setup_logging(); import logging, huggingface_hub, datasets; "
            "logging.getLogger('huggingface_hub.utils._http').warning('hub says'); "
            "logging.getLogger('datasets.builder').warning('datasets says'); logging.getLogger('rlft.x').warning('we say')")
    err = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True).stderr
    assert [err.count(words) for words in ("hub says", "datasets says", "we say")] == [1, 1, 1], err


def test_saved_config_changes_skip_options_newer_than_the_run(tmp_path):
    """A run saved before an option existed still resumes (or is reused) after an upgrade; a changed value
    does not."""
    import yaml

    from rlft.config import to_dict
    from rlft.runs import CONFIG, saved_config_changes
    from rlft.sft import SFTConfig

    saved = to_dict(SFTConfig())
    del saved["lora"]["use_dora"]  # an option this run's rlft did not have yet
    saved["lora"]["r"] = 8
    saved["output_dir"] = "elsewhere"
    (tmp_path / CONFIG).write_text(yaml.safe_dump(saved))
    assert saved_config_changes(tmp_path, SFTConfig(), may_change=("output_dir",)) == ["lora.r: 8 -> 16"]
    assert saved_config_changes(tmp_path / "never_ran", SFTConfig()) == []

    # Scorers in a list likewise: an option they gained is skipped, a scorer's timeout (it only ends a hang) may
    # change on resume, another scorer may not.
    from reward_models.scorers import ScorerConfig
    from rlft.ppo.config import RESUMABLE_CHANGES, PPOConfig

    ppo = PPOConfig(reward=[ScorerConfig(kind="function", path="tests.test_ppo:share_of_target")])
    saved = to_dict(ppo)
    del saved["reward"][0]["timeout"]
    (tmp_path / CONFIG).write_text(yaml.safe_dump(saved))
    assert saved_config_changes(tmp_path, ppo) == []
    saved["reward"][0]["timeout"] = 0.0
    (tmp_path / CONFIG).write_text(yaml.safe_dump(saved))
    assert saved_config_changes(tmp_path, ppo) == ["reward.0.timeout: 0.0 -> 300.0"]
    assert saved_config_changes(tmp_path, ppo, RESUMABLE_CHANGES) == []
    saved["reward"].append({**saved["reward"][0], "name": "other"})
    (tmp_path / CONFIG).write_text(yaml.safe_dump(saved))
    assert saved_config_changes(tmp_path, ppo, RESUMABLE_CHANGES) == ["reward: 2 -> 1"]
