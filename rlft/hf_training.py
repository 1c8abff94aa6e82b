"""Our TrainConfig as the TrainingArguments that TRL's SFT and reward trainers take."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rlft.config import ModelConfig, TrainConfig
from rlft.models import torch_dtype


def training_kwargs(train: TrainConfig, model: ModelConfig, output_dir: Path, seed: int) -> dict:
    """Keyword arguments for trl's SFTConfig / RewardConfig. TensorBoard goes to output_dir/tensorboard."""
    # transformers 5 takes the TensorBoard folder from the environment only.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(output_dir / "tensorboard")
    dtype = torch_dtype(model, "cuda" if torch.cuda.is_available() else "cpu")
    return dict(
        output_dir=str(output_dir / "checkpoints"),
        report_to=["tensorboard"],
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is read as a share of the steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        max_length=train.max_length,
        logging_steps=train.logging_steps,
        eval_strategy="steps" if train.eval_steps else "no",
        eval_steps=train.eval_steps or None,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # add_lora already set up checkpointing on the peft model; the trainer must not redo it.
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        # Without this, evaluate() keeps every batch's (batch, length, vocab) logits: GBs for a 49k vocab.
        prediction_loss_only=True,
    )


def last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = output_dir / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None
