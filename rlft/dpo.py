"""`rlft dpo`: preference optimisation without a reward model or sampling, on TRL's DPOTrainer.

setup (config, pairs, the base with the SFT adapter merged in, a new LoRA adapter) -> held-out pair accuracy of
the implicit reward before -> train (resumable) -> after -> save the adapter (its reference: the SFT adapter, as
PPO's) -> metrics.json last.

The reference is the policy with its adapter off, as in PPO: the base with `sft_adapter` merged in, so the implicit
reward beta * log pi(y|x) / pi_ref(y|x) is relative to the SFT model, and at step 0 (LoRA's B = 0) the policy is
the reference exactly. (Given a peft model, TRL would add a frozen copy of its adapter as the reference: an
identity LoRA, the same numbers at twice the adapter's memory; rlft removes it.) Losses, per pair with
h = log pi/pi_ref(chosen) - log pi/pi_ref(rejected):
  sigmoid  DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h)
  ipo      IPO (Azar et al. 2023, eq. 17): (h / tokens - 1 / (2 beta))^2, h averaged per completion token as TRL does
  simpo    reference-free (SimPO, Meng et al. 2024, eq. 6 without its margin gamma): -log sigmoid(beta * (mean token
           log-prob of chosen - of rejected)); no reference pass at all
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlft import hf_training, runs
from rlft.config import DataConfig, LoraConfig, ModelConfig, option, require, require_seed, section
from rlft.data import load_splits, require_chat_template, split_pair
from rlft.distributed import is_main_process
from rlft.errors import RlftError
from rlft.hf_training import RESUMABLE_CHANGES, TrainConfig, last_checkpoint, training_kwargs
from rlft.models import add_lora, context_length, count_parameters, load_tokenizer
from rlft.policy import active_adapter, adapter_state_dict, load_reference, save_adapter
from rlft.publish import Publishing, push, write_model_card

log = logging.getLogger(__name__)
TRL_LOSS = {"sigmoid": "sigmoid", "ipo": "ipo", "simpo": "sigmoid_norm"}  # simpo: TRL's length-normalised sigmoid
ACCURACY = "eval_pair_accuracy"


@dataclass
class DPOTrainConfig(TrainConfig):
    learning_rate: float = option(5e-5, "Peak learning rate (DPO on LoRA moves fast: 2e-4 over-fits the pairs).")


@dataclass
class DPOConfig(Publishing):
    output_dir: str = option("runs/dpo", "Where the adapter, tokenizer, config, metrics and logs go.")
    seed: int = option(0, "Seed for data order, hold-out split and LoRA init.")
    resume: bool = option(True, "Continue from the last checkpoint in output_dir if there is one.")
    sft_adapter: str = option(
        "runs/sft", "SFT adapter merged into the base before training: the policy starts as the SFT model, which is "
        "also the reference (empty: the base model itself).")
    loss_type: Literal["sigmoid", "ipo", "simpo"] = option(
        "sigmoid", "sigmoid: DPO; ipo: IPO (bounded, against over-fitting deterministic preferences); simpo: "
        "reference-free, length-normalised (SimPO without its margin).")
    beta: float = option(0.1, "Strength of the pull to the reference: DPO's beta, IPO's tau; simpo's reward scale "
                         "(its paper uses about 2).")
    model: ModelConfig = section(ModelConfig, "The base model.")
    lora: LoraConfig = section(LoraConfig, "The trained adapter (the policy).")
    data: DataConfig = section(DataConfig, "Preference pairs as `rlft reward` reads them: chosen + rejected (+ prompt), "
                               "text or messages; `rlft preferences` writes them.")
    train: DPOTrainConfig = section(DPOTrainConfig, "Optimisation; train.max_length cuts prompt + completion.")

    def __post_init__(self):
        super().__post_init__()
        require_seed(self.seed)
        require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        require(self.lora.bias == "none", "lora.bias",
                "DPO trains the adapter only: biases are base weights, so training them would move the reference "
                "(the adapter switched off) as well; use bias: none")


@dataclass
class DPORun:
    """What `setup` builds and `run` trains and saves."""
    trainer: object  # TRL's DPOTrainer (or the reference-free one)
    model: object  # the peft model: the merged SFT base and the trained adapter
    tokenizer: object
    out: Path
    checkpoint: str | None  # the checkpoint a rerun resumes from
    data: dict  # the data's fingerprint (rlft.runs.check_data)
    trainable: int


def setup(config: DPOConfig) -> DPORun:
    """The run folder, the pairs (checked before any model loads), the policy and TRL's trainer."""
    from trl import DPOConfig as TrlDPOConfig

    runs.seed_everything(config.seed)
    checkpoint = last_checkpoint(config.output_dir) if config.resume else None
    out = runs.prepare(config.output_dir, config, "dpo", resuming=checkpoint is not None,
                       may_change=RESUMABLE_CHANGES)
    train_rows, eval_rows, _ = load_splits(config.data, ("preference",), config.seed, "DPO pairs")
    data = runs.check_data(out, config.data.path, train_rows, eval_rows, resuming=checkpoint is not None)
    if len(eval_rows) == 0:
        raise RlftError(f"the evaluation split of '{config.data.path}' is empty: check data.eval_split")
    train_rows, eval_rows = explicit_prompts(train_rows), explicit_prompts(eval_rows)
    hf_training.check_train(config.train)
    tokenizer = load_tokenizer(config.model)
    if isinstance(train_rows[0]["prompt"], list):
        require_chat_template(tokenizer, config.model.name_or_path)
    model = add_lora(load_reference(config.model, config.sft_adapter or None), config.model, config.lora)
    trainable, total = count_parameters(model)
    log.info("DPO (%s): LoRA %.2fM trainable of %.1fM parameters, %d pairs", config.loss_type, trainable / 1e6,
             total / 1e6, len(train_rows))
    # Rows past the model's positions would crash absolute-position models: cut them at the context, as SFT does.
    max_length = min(config.train.max_length, context_length(model) or config.train.max_length)
    args = TrlDPOConfig(**{**training_kwargs(config.train, model, out, config.seed), "max_length": max_length},
                        beta=config.beta, loss_type=[TRL_LOSS[config.loss_type]], dataset_num_proc=1)
    trainer = hf_training.build_trainer(trainer_class(config.loss_type), model, args, train_rows, eval_rows,
                                        tokenizer)
    for split, rows in (("training", trainer.train_dataset), ("held-out", trainer.eval_dataset)):
        if len(rows) == 0:  # TRL drops the pairs whose prompt fills train.max_length
            raise RlftError(f"every {split} pair of '{config.data.path}' has a prompt of train.max_length="
                            f"{max_length} tokens or more: raise train.max_length or shorten the prompts")
    return DPORun(trainer, model, tokenizer, out, checkpoint, data, trainable)


def run(config: DPOConfig) -> dict:
    started = time.time()
    dpo = setup(config)
    trainer, out = dpo.trainer, dpo.out
    final = {}  # the held-out figures of the last measurement, after training: one pass serves all of them

    def measure() -> float:
        chosen, rejected = implicit_rewards(trainer, config.loss_type, config.beta)
        final.update(reward_figures(chosen, rejected))
        return pair_accuracy(chosen, rejected)

    fitted = hf_training.fit(trainer, out, config, dpo.data, dpo.checkpoint, ACCURACY, measure)

    weights = adapter_state_dict(dpo.model)  # every process: gathered from the shards under FSDP
    if not is_main_process():  # under `accelerate launch` one process writes the run's files
        return {}
    save_adapter(dpo.model, out, config.model, reference_adapter=config.sft_adapter or None, state_dict=weights)
    dpo.tokenizer.save_pretrained(out)
    metrics = runs.stage_metrics({
        **fitted,
        "eval": final,
        "train_rows": len(trainer.train_dataset),
        "eval_rows": len(trainer.eval_dataset),
        "steps": trainer.state.global_step,
        "trainable_parameters": dpo.trainable,
    }, started)
    write_model_card(out, title=f"DPO ({config.loss_type}) adapter for {config.model.name_or_path}",
                     base_model=config.model.name_or_path,
                     lineage=[config.model.name_or_path, *([f"sft ({config.sft_adapter})"] if config.sft_adapter else []),
                              f"dpo ({config.data.path})"], config=config, metrics=metrics, tags=["dpo", "lora"])
    runs.write_json(out / runs.METRICS, metrics)
    push(out, config)
    return metrics


def explicit_prompts(dataset):
    """Pairs as TRL's DPOTrainer takes them, whichever shape `rlft reward` reads (rlft.data.split_pair: message lists,
    UltraFeedback's layout): prompt, chosen, rejected. Texts without a prompt stay as they are: TRL cuts their shared
    prefix itself and keeps the space before each reply ("The sky is" + " blue.")."""
    if "prompt" not in dataset.column_names and isinstance(dataset[0]["chosen"], str):
        return dataset.select_columns(["chosen", "rejected"])

    def explicit(row):
        (prompt, chosen), (_, rejected) = split_pair(row)
        if isinstance(prompt, list):
            return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]}
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return dataset.map(explicit, remove_columns=dataset.column_names)


def trainer_class(loss_type: str):
    """TRL's DPOTrainer with rlft's reference, the adapter off; for the reference-free loss, reference log-probs
    of zero (no reference pass: TRL's length-normalised sigmoid then is SimPO's loss)."""
    from trl import DPOTrainer

    class RlftDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            model = self.accelerator.unwrap_model(self.model)
            if "ref" in model.peft_config:  # TRL's frozen copy of the (identity) adapter: the adapter off instead
                model.delete_adapter("ref")
            if loss_type == "simpo":
                self.precompute_ref_logps = True  # read from the rows (TRL's precompute would hash the whole model)
                self.train_dataset, self.eval_dataset = (
                    rows.add_column("ref_chosen_logps", [0.0] * len(rows)).add_column(
                        "ref_rejected_logps", [0.0] * len(rows)) for rows in (self.train_dataset, self.eval_dataset))

    return RlftDPOTrainer


def completion_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's completion and its token count, both (rows,), from TRL's preference
    collator's batch (input_ids, attention_mask, completion_mask: (rows, tokens), the chosen rows then the rejected),
    through TRL's fused head as its loss takes them: never the whole batch's logits."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
    mask = batch["completion_mask"][:, 1:]
    return outputs.log_probs[:, -mask.size(1):].sum(-1), mask.sum(-1)


@torch.no_grad()
def implicit_rewards(trainer, loss_type: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit reward of each held-out pair's chosen and of its rejected reply, (pairs,) each: beta x log
    pi / pi_ref of the completion (the reference: the adapter off), or for simpo beta x its mean token log-prob."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for batch in trainer.get_eval_dataloader():
            logps, tokens = completion_logps(model, batch)
            if loss_type == "simpo":
                scores = logps / tokens.clamp(min=1)
            else:
                with active_adapter(model, None):
                    scores = logps - completion_logps(model, batch)[0]
            pair_chosen, pair_rejected = (beta * scores).chunk(2)  # each process's pairs, then every process's
            chosen.append(trainer.accelerator.gather_for_metrics(pair_chosen))
            rejected.append(trainer.accelerator.gather_for_metrics(pair_rejected))
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def reward_figures(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """TRL's held-out DPO figures from the implicit rewards of each pair's chosen and rejected reply, (pairs,) each:
    their means, the mean margin, and the share of pairs ranked right (strictly, as TRL counts it). For simpo these
    are SimPO's length-normalised rewards, where TRL reports beta x the summed log-probs."""
    margins = chosen - rejected
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margins": margins.mean().item(), "rewards/accuracies": (margins > 0).float().mean().item()}


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose chosen reply the implicit reward ranks above the rejected, a tie counting half: at
    step 0, where the policy is its reference, every pair ties and the accuracy is chance, 0.5."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()
