"""Our TrainConfig as the TrainingArguments that TRL's SFT and reward trainers take."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch

from rlft.config import ModelConfig, TrainConfig
from rlft.errors import RlftError
from rlft.models import torch_dtype
from rlft.runs import unsafe_checkpoint, write_json

log = logging.getLogger(__name__)


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


# Keys a rerun may change and still resume its checkpoint: how long it runs and how often it logs.
RESUMABLE_CHANGES = ("output_dir", "resume", "num_samples", "merge", "train.epochs", "train.max_steps",
                     "train.logging_steps", "train.eval_steps", "train.save_steps")
COMPLETE = "rlft-complete"  # written into a Trainer checkpoint once every file of it is on disk
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint in output_dir/checkpoints; torn ones (no marker) are deleted."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted((int(m[1]), p) for p in folder.iterdir() if (m := CHECKPOINT_DIR.match(p.name)) and p.is_dir())
    complete = [(step, path) for step, path in found if (path / COMPLETE).is_file()]
    newest = complete[-1][0] if complete else -1
    for step, path in found:
        if step > newest and not (path / COMPLETE).is_file():
            shutil.rmtree(path, ignore_errors=True)  # half-written by a killed run: the Trainer would choke on it
    return str(complete[-1][1]) if complete else None


def keep_trainable_float32(model) -> None:
    """Undo TRL's cast of a quantized model's trainable weights to bf16 (the QLoRA paper's recipe), right after
    the trainer is built: master weights and optimiser state stay float32, and a score head matches the float32
    compute (in bf16 it fails on the first forward)."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()


def train(trainer, checkpoint: str | None) -> None:
    """trainer.train, resuming from `checkpoint`; a checkpoint holding code instead of tensors is refused."""
    import pickle

    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        """The Trainer writes checkpoint-N in place; this marker, written after its last file, makes it count.
        A kill or a full disk mid-save leaves a folder without it, which `last_checkpoint` skips and removes."""

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_json(folder / COMPLETE, {"step": state.global_step})

    trainer.add_callback(MarkComplete)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except pickle.UnpicklingError as e:  # the Trainer loads optimizer/RNG states with weights_only=True
        raise unsafe_checkpoint(checkpoint, e) from None


def check_finite_losses(log_history: list[dict]) -> None:
    for entry in log_history:
        if "loss" in entry and not math.isfinite(entry["loss"]):
            raise RlftError(
                f"training loss became {entry['loss']} at step {entry.get('step')}: lower train.learning_rate "
                "or use model.dtype=float32; the last good checkpoint is kept in output_dir/checkpoints"
            )
