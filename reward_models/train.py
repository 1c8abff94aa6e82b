"""Stage 2, `rlft reward`: a Bradley-Terry reward model on preference pairs, on TRL's RewardTrainer.

setup (config, data, model) -> tokenize pairs with the scorers' `encode` -> held-out pairwise accuracy
before -> train (resumable) -> accuracy after -> normalization.json -> save model + tokenizer -> metrics.json
last. Fully trained: a plain classifier (AutoModelForSequenceClassification loads it). LoRA: the adapter and
its score head in peft's format plus rlft_adapter.json (its base and the SFT adapter merged under it), so
`kind: model` scorers rebuild it on its own base and PPO's `kind: adapter` scores with it on the policy's.

The loss is TRL's -log sigmoid(r(chosen) - r(rejected) [- margin]) (Ouyang et al. 2022, eq. 1). We
tokenize the pairs ourselves, so TRL skips its own formatting: training and scoring share one format.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from reward_models.scorers import NORMALIZATION, encode, length_limit, score_ids
from rlft import runs
from rlft.config import DataConfig, LoraConfig, ModelConfig, option, require, require_seed, section
from rlft.data import load_splits, split_pair
from rlft.distributed import full_state_dict, is_main_process
from rlft.errors import RlftError
from rlft import hf_training
from rlft.hf_training import RESUMABLE_CHANGES, TrainConfig, last_checkpoint, training_kwargs
from rlft.publish import Publishing, push, write_model_card
from rlft.models import MINILM, add_lora, count_parameters, load_tokenizer
from rlft.policy import adapter_state_dict, load_reference, save_adapter

log = logging.getLogger(__name__)


@dataclass
class RewardModelConfig(ModelConfig):
    name_or_path: str = option(
        MINILM, "Any model AutoModelForSequenceClassification loads (a new 1-output head is added): a hub id, "
        "a local directory, or an embedded name (all-minilm-l6-v2, smollm2-135m-instruct).",
    )


@dataclass
class RewardConfig(Publishing):
    output_dir: str = option("runs/reward", "Where the model, tokenizer, normalization, config and metrics go.")
    seed: int = option(0, "Seed for the head's initialisation, data order and the hold-out split.")
    resume: bool = option(True, "Continue from the last checkpoint in output_dir if there is one.")
    lora_enabled: bool = option(
        False, "Train a LoRA adapter and the score head (saved in peft's format) instead of all weights; full "
        "fine-tuning suits a small backbone like MiniLM, LoRA a causal LM (and a quantized one).",
    )
    sft_adapter: str = option(
        "", "An SFT adapter merged into the backbone before training (InstructGPT starts its reward model from the "
        "SFT model): on the same base, PPO then scores with this reward adapter on its own weights (empty: none).")
    score_margin: float = option(
        0.0, "Where pairs carry their judge's scores (score_chosen, score_rejected: rlft preferences writes them), "
        "train with a margin of score_margin x their gap in the loss (Llama 2's margin loss), so a pair the judge "
        "separates widely must be separated widely; 0: no margin, or a `margin` column of your own.")
    min_score_gap: float = option(
        0.0, "Where pairs carry their judge's scores: train only on the pairs the judge separates by at least this "
        "(a near-tie is a coin flip of a label); the held-out pairs are all kept, so accuracy is measured on the "
        "same pairs either way. 0: every pair.")
    model: RewardModelConfig = section(RewardModelConfig, "The backbone.")
    lora: LoraConfig = section(LoraConfig, "The adapter, when lora_enabled (the score head is trained in full).")
    data: DataConfig = section(
        DataConfig, "Preference pairs: chosen + rejected (+ optional prompt, margin), text or messages.",
    )
    train: TrainConfig = section(TrainConfig, "Optimisation; train.max_length also truncates every pair.")

    def __post_init__(self):
        super().__post_init__()
        require_seed(self.seed)
        require(self.model.quantization == "none" or self.lora_enabled, "model.quantization",
                "a quantized backbone can only be trained with lora_enabled: true")
        require(self.score_margin >= 0, "score_margin", f"must be >= 0 (0: no margin), got {self.score_margin}")
        require(self.min_score_gap >= 0, "min_score_gap", f"must be >= 0 (0: every pair), got {self.min_score_gap}")


def run(config: RewardConfig) -> dict:
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    started = time.time()
    runs.seed_everything(config.seed)  # before loading: it initialises the new score head
    checkpoint = last_checkpoint(config.output_dir) if config.resume else None
    out = runs.prepare(config.output_dir, config, "reward", resuming=checkpoint is not None,
                       may_change=RESUMABLE_CHANGES)
    main = is_main_process()  # under `accelerate launch` the one process that writes the run's files

    # Data first: a wrong column should fail before the model loads.
    train_rows, eval_rows, _ = load_splits(config.data, ("preference",), config.seed, "reward data")
    data = runs.check_data(out, config.data.path, train_rows, eval_rows, resuming=checkpoint is not None)
    if config.min_score_gap:
        train_rows = clear_pairs(train_rows, config.min_score_gap, config.data.path)
    if config.score_margin:
        train_rows = with_score_margin(train_rows, config.score_margin, config.data.path)
    if len(eval_rows) == 0:
        raise RlftError(f"the evaluation split of '{config.data.path}' is empty: check data.eval_split")
    hf_training.check_train(config.train)
    tokenizer = load_tokenizer(config.model)
    model = load_reference(config.model, config.sft_adapter or None,
                           loader=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    max_length = length_limit(model, tokenizer, config.train.max_length)
    train_data, eval_data = (tokenize_pairs(rows, tokenizer, max_length) for rows in (train_rows, eval_rows))
    if config.lora_enabled:
        model = add_lora(model, config.model, config.lora, task_type="SEQ_CLS")  # SEQ_CLS trains the head too
    else:
        model.requires_grad_(True)  # load_model returns it frozen
        if config.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)
    log.info("training %.1fM of %.1fM parameters on %d pairs", trainable / 1e6, total / 1e6, len(train_data))

    # Batches of similar length: with short replies, padding is most of the compute on a CPU. The trainer
    # keeps our `length` column for its sampler only if it keeps unused columns; TRL's collator ignores them.
    args = TrlRewardConfig(**training_kwargs(config.train, model, out, config.seed),
                           train_sampling_strategy="group_by_length", remove_unused_columns=False)
    trainer = hf_training.build_trainer(RewardTrainer, model, args, train_data, eval_data, tokenizer)
    fitted = hf_training.fit(trainer, out, config, data, checkpoint, "eval_accuracy", lambda: pairwise_accuracy(
        model, eval_data, tokenizer.pad_token_id, config.train.batch_size))

    # Every process: the weights are gathered from the shards, the scores computed on them, under FSDP.
    weights = adapter_state_dict(model) if config.lora_enabled else full_state_dict(model)
    # The scores of the training completions: when they are SFT samples (as `rlft preferences` makes
    # them), normalising by these makes the SFT policy's rewards mean 0 and std 1 at the start of PPO.
    completions = list(train_data["chosen_ids"]) + list(train_data["rejected_ids"])
    scores = score_ids(model, completions, tokenizer.pad_token_id, config.train.batch_size)
    if not main:
        return {}
    if config.lora_enabled:
        save_adapter(model, out, config.model, reference_adapter=config.sft_adapter or None, state_dict=weights)
    else:
        model.save_pretrained(out, state_dict=weights)
    tokenizer.model_max_length = max_length  # scorers of this model truncate where training did
    tokenizer.save_pretrained(out)
    normalization = {"mean": scores.mean().item(), "std": max(scores.std().item(), 1e-6), "count": len(scores)}
    runs.write_json(out / NORMALIZATION, normalization)
    metrics = runs.stage_metrics({
        **fitted,
        "train_rows": len(train_data),
        "eval_rows": len(eval_data),
        "steps": trainer.state.global_step,
        "trainable_parameters": trainable,
        "normalization": normalization,
    }, started)
    write_model_card(out, title=f"Reward model on {config.model.name_or_path}", base_model=config.model.name_or_path,
                     lineage=[config.model.name_or_path, *([f"sft ({config.sft_adapter})"] if config.sft_adapter else []),
                              f"reward ({config.data.path})"], config=config,
                     metrics=metrics, tags=["reward-model"], library="peft" if config.lora_enabled else "transformers",
                     pipeline_tag="text-classification")
    runs.write_json(out / runs.METRICS, metrics)
    push(out, config)
    return metrics


def clear_pairs(dataset, gap: float, path: str):
    """The pairs whose judge scores differ by at least `gap` (rows from rlft preferences carry both scores)."""
    missing = {"score_chosen", "score_rejected"} - set(dataset.column_names)
    if missing:
        raise RlftError(f"min_score_gap is set but '{path}' has no {' or '.join(sorted(missing))} column: use pairs "
                        "from rlft preferences, or set min_score_gap=0")
    kept = [i for i, (chosen, rejected) in enumerate(zip(dataset["score_chosen"], dataset["score_rejected"]))
            if chosen - rejected >= gap]
    if not kept:
        raise RlftError(f"no training pair of '{path}' has judge scores {gap:g} apart: lower min_score_gap")
    return dataset.select(kept)


def with_score_margin(dataset, scale: float, path: str):
    """The pairs with margin = scale * (score_chosen - score_rejected): the loss becomes
    -log sigmoid(r(chosen) - r(rejected) - margin). Held-out accuracy ignores it."""
    missing = {"score_chosen", "score_rejected"} - set(dataset.column_names)
    if missing or "margin" in dataset.column_names:
        problem = f"has no {' or '.join(sorted(missing))} column" if missing else "already has a `margin` column"
        raise RlftError(f"score_margin is set but '{path}' {problem}: use pairs from rlft preferences, or set "
                        "score_margin=0")
    gaps = [scale * (chosen - rejected) for chosen, rejected in zip(dataset["score_chosen"], dataset["score_rejected"])]
    return dataset.add_column("margin", gaps)


def tokenize_pairs(dataset, tokenizer, max_length: int):
    """chosen_ids / rejected_ids (and margin, if given) through scorers.encode, the scorers' own format;
    `length` lets the trainer batch pairs of similar length."""

    def tokenize(row):
        (chosen_prompt, chosen), (rejected_prompt, rejected) = split_pair(row)
        chosen_ids = encode(tokenizer, chosen_prompt, chosen, max_length)
        rejected_ids = encode(tokenizer, rejected_prompt, rejected, max_length)
        return {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "length": len(chosen_ids) + len(rejected_ids)}

    return dataset.map(tokenize, remove_columns=[c for c in dataset.column_names if c != "margin"])


def pairwise_accuracy(model, pairs, pad_token_id: int, batch_size: int) -> float:
    """Share of pairs where r(chosen) > r(rejected) strictly: a tie (an untrained constant head) is a miss."""
    chosen = score_ids(model, list(pairs["chosen_ids"]), pad_token_id, batch_size)
    rejected = score_ids(model, list(pairs["rejected_ids"]), pad_token_id, batch_size)
    return (chosen > rejected).float().mean().item()
