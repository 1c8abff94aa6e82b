"""`rlft dpo`: DPO, IPO and reference-free SimPO on TRL's DPOTrainer (rlft/dpo.py), on the tiny Llama."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlft.cli import main
from rlft.config import load_config
from rlft.dpo import DPOConfig, implicit_rewards, pair_accuracy, reward_figures, run, setup
from rlft.policy import active_adapter, adapter_info
from tests.test_reward import write_marker_pairs

TINY = Path(__file__).parents[1] / "configs" / "tiny" / "dpo.yaml"


def completion_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand, from the whole logits: each row's summed log-prob of its completion tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].float()
    return (logps * mask).sum(-1), mask.sum(-1)


def tiny_config(lm, pairs, out, *overrides) -> DPOConfig:
    # float32: the hand-computed losses below are compared to 1e-5
    return load_config(DPOConfig, TINY, [f"model.name_or_path={lm}", f"data.path={pairs}", f"output_dir={out}",
                                         "model.dtype=float32", *overrides])


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("ipo", 0.5), ("simpo", 2.0)])
def test_each_loss_is_its_formula_by_hand(loss_type, beta, tiny_lm_dir, tmp_path):
    """TRL's loss on one batch against the paper's formula from log-probs computed here, with the adapter moved off
    its identity start so that policy and reference differ."""
    pairs = write_marker_pairs(tmp_path / "pairs.jsonl", 32)
    dpo = setup(tiny_config(tiny_lm_dir, pairs, tmp_path / "run", f"loss_type={loss_type}", f"beta={beta}"))
    torch.manual_seed(0)
    assert list(dpo.model.peft_config) == ["default"]  # no frozen copy: the reference is the adapter off
    with torch.no_grad():
        for name, parameter in dpo.model.named_parameters():
            if "lora_B" in name:
                assert parameter.requires_grad
                parameter.normal_(std=0.2)
    batch = next(iter(dpo.trainer.get_train_dataloader()))
    dpo.model.eval()
    with torch.no_grad():
        trl_loss = dpo.trainer.compute_loss(dpo.model, batch).item()
        logps, tokens = completion_logps(dpo.model, batch)
        with active_adapter(dpo.model, None):  # the reference: the adapter off
            ref_logps, _ = completion_logps(dpo.model, batch)
    (chosen, rejected), (chosen_ref, rejected_ref) = logps.chunk(2), ref_logps.chunk(2)
    n_chosen, n_rejected = tokens.chunk(2)
    if loss_type == "sigmoid":  # Rafailov et al. 2023, eq. 7
        by_hand = -F.logsigmoid(beta * ((chosen - chosen_ref) - (rejected - rejected_ref)))
    elif loss_type == "ipo":  # Azar et al. 2023, eq. 17, per completion token as TRL takes it
        by_hand = ((chosen - chosen_ref) / n_chosen - (rejected - rejected_ref) / n_rejected - 1 / (2 * beta)) ** 2
    else:  # SimPO (Meng et al. 2024, eq. 6, margin 0): no reference at all
        by_hand = -F.logsigmoid(beta * (chosen / n_chosen - rejected / n_rejected))
    assert (chosen != chosen_ref).all()  # the adapter moved the policy: the check is not at the trivial point
    assert trl_loss == pytest.approx(by_hand.mean().item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_the_held_out_figures_are_trls_own(loss_type, beta, tiny_lm_dir, tmp_path):
    """The report's rewards/chosen, rejected, margins and accuracies come from the one implicit-reward pass that
    also gives the pair accuracy: they equal TRL's evaluate() on the same held-out pairs, with a moved adapter.
    (SimPO's are its paper's length-normalised rewards, where TRL reports beta x the summed log-probs.)"""
    pairs = write_marker_pairs(tmp_path / "pairs.jsonl", 48)
    dpo = setup(tiny_config(tiny_lm_dir, pairs, tmp_path / "run", f"loss_type={loss_type}", f"beta={beta}"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in dpo.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    ours = reward_figures(*implicit_rewards(dpo.trainer, loss_type, beta))
    trl = dpo.trainer.evaluate()
    assert 0 < ours["rewards/accuracies"] < 1  # pairs ranked both ways: the figures are not at a trivial point
    for key, value in ours.items():
        assert value == pytest.approx(trl[f"eval_{key}"], rel=1e-4, abs=1e-6), key


def test_the_policy_is_its_reference_at_step_0_and_that_reference_is_the_sft_model(tiny_lm_dir, data, tmp_path,
                                                                                  capsys):
    """With an SFT adapter merged in, the new adapter starts as the identity: every held-out pair's log-ratio is
    exactly 0, so every implicit reward ties and the pair accuracy is chance. The saved adapter names the SFT
    adapter as its reference, as PPO's does, so `rlft eval` sets it against the SFT model."""
    sft = tmp_path / "sft"
    assert main(["sft", "--config", str(TINY.parent / "sft.yaml"), f"output_dir={sft}",
                 f"model.name_or_path={tiny_lm_dir}", f"data.path={data / 'sft.jsonl'}"]) == 0, capsys.readouterr().err
    config = tiny_config(tiny_lm_dir, data / "pairs.jsonl", tmp_path / "dpo", f"sft_adapter={sft}")
    dpo = setup(config)
    chosen, rejected = implicit_rewards(dpo.trainer, "sigmoid", config.beta)
    assert len(chosen) == len(dpo.trainer.eval_dataset) > 0
    assert torch.equal(chosen, torch.zeros_like(chosen)) and torch.equal(rejected, torch.zeros_like(rejected))
    assert pair_accuracy(chosen, rejected) == 0.5
    batch = next(iter(dpo.trainer.get_eval_dataloader()))
    raw = setup(tiny_config(tiny_lm_dir, data / "pairs.jsonl", tmp_path / "raw"))  # no SFT adapter
    with torch.no_grad():  # the reference (adapter off) is the SFT model, not the raw base
        with active_adapter(dpo.model, None):
            reference, _ = completion_logps(dpo.model, batch)
        raw_base, _ = completion_logps(raw.model, batch)
    assert not torch.allclose(reference, raw_base)

    metrics = run(replace(config, output_dir=str(tmp_path / "trained")))
    assert metrics["eval_pair_accuracy_before"] == 0.5
    assert adapter_info(tmp_path / "trained")[1] == str(sft)


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.5), ("ipo", 0.5), ("simpo", 2.0)])
def test_each_loss_learns_a_toy_preference(loss_type, beta, tiny_lm_dir, tmp_path):
    """Chosen replies hold the word "great", rejected ones a filler word in its place: after a few dozen steps the
    implicit reward prefers the held-out chosen replies, which it did not before."""
    pairs = write_marker_pairs(tmp_path / "pairs.jsonl", 160)
    metrics = run(tiny_config(tiny_lm_dir, pairs, tmp_path / "run", f"loss_type={loss_type}", f"beta={beta}",
                              "train.max_steps=40", "train.save_steps=40", "train.batch_size=8"))
    assert metrics["eval_pair_accuracy_before"] <= 0.7
    assert metrics["eval_pair_accuracy_after"] >= 0.85, metrics
    assert metrics["eval"]["rewards/margins"] > 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["steps"] == 40 and (tmp_path / "run" / "adapter_model.safetensors").is_file()
