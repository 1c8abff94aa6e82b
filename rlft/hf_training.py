"""What the stages on TRL's trainers (sft, reward) share: their TrainConfig, its TrainingArguments, checkpoints
that count only when complete, resuming, and the figures measured before training."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import pickle
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from rlft import runs
from rlft.config import option, require
from rlft.distributed import fsdp_on_cpu, is_main_process
from rlft.errors import RlftError
from rlft.runs import read_json, reading, unsafe_checkpoint, write_json

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings for the stages that run on TRL's trainers (sft, reward)."""
    epochs: float = option(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = option(0, "Stop after this many optimiser steps (0: use epochs).")
    batch_size: int = option(8, "Rows per device per forward pass.")
    gradient_accumulation_steps: int = option(1, "Forward passes per optimiser step.")
    learning_rate: float = option(2e-4, "Peak learning rate.")
    lr_scheduler: str = option("cosine", "transformers scheduler name: linear, cosine, constant, ...")
    warmup_ratio: float = option(0.03, "Share of steps spent warming up the learning rate.")
    warmup_steps: int = option(0, "Warm up for this many steps instead (0: use warmup_ratio).")
    optim: str = option(
        "adamw_torch", "Any HF Trainer optimizer name: adamw_torch, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, "
        "adafactor, sgd, lion_8bit, ... (bitsandbytes' 8-bit states cut optimizer memory by ~75%).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this.")
    max_length: int = option(512, "Truncate tokenized rows to this many tokens.")
    logging_steps: int = option(10, "Log every this many steps (TensorBoard and metrics).")
    eval_steps: int = option(0, "Evaluate every this many steps during training (0: only before and after).")
    save_steps: int = option(100, "Checkpoint every this many steps; a rerun with resume=true continues from the last.")

    def __post_init__(self):
        require(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        require(self.max_steps >= 0, "max_steps", "must be >= 0 (0: use epochs)")
        require(self.batch_size > 0, "batch_size", f"must be a positive integer, got {self.batch_size}")
        require(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be >= 1")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0 (0: use warmup_ratio)")
        require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.max_length > 0, "max_length", "must be > 0")
        require(self.logging_steps > 0, "logging_steps", "must be >= 1")
        require(self.save_steps > 0, "save_steps", "must be >= 1")


def training_kwargs(train: TrainConfig, model, output_dir: Path, seed: int) -> dict:
    """Keyword arguments for trl's SFTConfig / RewardConfig. TensorBoard goes to output_dir/tensorboard. Mixed
    precision follows the loaded model's weights (never quantized: its input embeddings): rlft.models.load_model
    decided their dtype once."""
    # transformers 5 takes the TensorBoard folder from the environment only.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(output_dir / "tensorboard")
    dtype = model.get_input_embeddings().weight.dtype
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
        warmup_steps=train.warmup_steps or train.warmup_ratio,  # a float in [0, 1) is read as a share of the steps
        optim=train.optim,
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
        # Without a GPU, say so: TrainingArguments then joins `accelerate launch`'s processes over gloo (else each
        # process trains alone on all the data).
        use_cpu=not torch.cuda.is_available(),
        # Without this, evaluate() keeps every batch's (batch, length, vocab) logits: GBs for a 49k vocab.
        prediction_loss_only=True,
    )


# Keys a rerun may change and still resume its checkpoint: how long it runs and how often it logs.
RESUMABLE_CHANGES = ("output_dir", "resume", "num_samples", "merge", "train.epochs", "train.max_steps",
                     "train.logging_steps", "train.eval_steps", "train.save_steps")
COMPLETE = "rlft-complete"  # written into a Trainer checkpoint once every file of it is on disk
BEFORE = "eval_before.json"  # the untrained model's figures, measured once: a resumed run reads them back
BEFORE_FIX = "set resume=false to start over (it holds the untrained model's figures, which cannot be measured again)"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint in output_dir/checkpoints, checked whole before the run touches anything
    (`check_checkpoint`); torn ones (no marker) are deleted."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted((int(m[1]), p) for p in folder.iterdir() if (m := CHECKPOINT_DIR.match(p.name)) and p.is_dir())
    complete = [(step, path) for step, path in found if (path / COMPLETE).is_file()]
    newest = complete[-1][0] if complete else -1
    for step, path in found:
        if step > newest and not (path / COMPLETE).is_file():
            shutil.rmtree(path, ignore_errors=True)  # half-written by a killed run: the Trainer would choke on it
    if not complete:
        return None
    check_checkpoint(complete[-1][1])
    before = Path(output_dir) / BEFORE
    if before.is_file():
        figures = read_json(before, BEFORE_FIX)
        if not figures or not all(isinstance(value, (int, float)) for value in figures.values()):
            raise RlftError(f"'{before}' is damaged (it must hold the untrained model's figures as numbers): "
                            f"{BEFORE_FIX}")
    return str(complete[-1][1])


def check_train(train: TrainConfig) -> None:
    """A train section's optimizer and scheduler names, checked before any model loads (the stage and its plan)."""
    check_optimizer(train.optim, "train.optim")
    check_scheduler(train.lr_scheduler, "train.lr_scheduler")


def check_optimizer(name: str, key: str) -> None:
    """Refuse an optimizer name the HF Trainer does not know, with the nearest one, before any model loads."""
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(names[:12])}, ..."
        raise RlftError(f"bad value for '{key}': unknown optimizer '{name}'; {hint}")


def check_scheduler(name: str, key: str) -> None:
    """Refuse a learning-rate scheduler name transformers does not know, before any model loads."""
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(names)}"
        raise RlftError(f"bad value for '{key}': unknown scheduler '{name}'; {hint}")


def optimizer(parameters, name: str, learning_rate: float, eps: float = 1e-8, weight_decay: float = 0.0):
    """The optimizer the HF Trainer would build for `name` (one mapping for every stage, PPO's included).

    `parameters`: a list of tensors, or of param-group dicts (e.g. {"params": [...], "lr": ...})."""
    from transformers import Trainer, TrainingArguments

    # TrainingArguments' defaults without building one: its __post_init__ resets accelerate's process state.
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else None
                for f in dataclasses.fields(TrainingArguments)}
    args = SimpleNamespace(**{**defaults, "optim": name, "learning_rate": learning_rate, "adam_epsilon": eps,
                              "weight_decay": weight_decay})
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    # The Trainer sets weight decay through parameter groups, not the constructor: so do we.
    parameters = list(parameters)
    groups = parameters if parameters and isinstance(parameters[0], dict) else [{"params": parameters}]
    return optimizer_class([{"weight_decay": weight_decay, **group} for group in groups], **kwargs)


def with_seeded_length_groups(trainer_class):
    """`trainer_class` whose group_by_length batches are drawn from (data_seed, epoch) alone.

    HF's LengthGroupedSampler draws from the global RNG, which a resumed run holds in another state than the
    uninterrupted run did at that epoch's start: the resumed epoch saw other batches (a tiny reward adapter
    ended 7e-5 away from the uninterrupted one). The epoch is read from the trainer's state when an epoch's
    batches are drawn (a resumed run restores it; accelerate's set_epoch does not reach a sampler behind a
    multi-process skip of the first batches), so every process and every resume draws the same order."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        def __init__(self, batch_size: int, lengths: list[int], seed: int, epoch_of):
            super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
            self.seed, self.epoch_of = seed, epoch_of

        def __iter__(self):
            self.generator.manual_seed(self.seed + self.epoch_of())
            return super().__iter__()

    class Seeded(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:
                sampler = SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, self.args.data_seed,
                                                     lambda: int(self.state.epoch or 0))
            return sampler

    Seeded.__name__ = trainer_class.__name__
    return Seeded


def build_trainer(trainer_class, model, args, train_data, eval_data, tokenizer):
    """The stage's TRL trainer, as sft and reward build it: length-grouped batches drawn from the data seed,
    trainable weights in float32, FSDP on CPU processes too."""
    trainer = with_seeded_length_groups(trainer_class)(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data, processing_class=tokenizer)
    keep_trainable_float32(model)
    shard_on_cpu(trainer)
    return trainer


def fit(trainer, out: Path, config, data: dict, checkpoint: str | None, name: str, measure) -> dict:
    """Train (resuming from `checkpoint`), with `measure()` (the figure `name`: eval loss, pairwise accuracy) taken
    before training starts (once: a resumed run reads it back) and after it ends -> {name}_before, {name}_after
    and train_time_s (the optimiser steps alone, this process's if it resumed)."""
    before = measured_before(trainer, out, checkpoint, name, measure)
    started = time.time()
    runs.begin(out, config, data)  # from here on this run writes in its folder
    train(trainer, checkpoint)
    train_time = time.time() - started
    check_finite_losses(trainer.state.log_history)
    after = measure()
    log.info("%s after training: %.4f (before %.4f)", name, after, before[name])
    return {f"{name}_before": before[name], f"{name}_after": after, "train_time_s": train_time}


def shard_on_cpu(trainer) -> None:
    """Right after the trainer is built: FSDP on CPU processes as well (rlft.distributed.fsdp_on_cpu)."""
    fsdp_on_cpu(trainer.accelerator)
    trainer.is_fsdp_enabled = getattr(trainer.accelerator.state, "fsdp_plugin", None) is not None


def measured_before(trainer, out: Path, checkpoint: str | None, name: str, measure) -> dict:
    """A figure of the untrained model (eval loss, pairwise accuracy), measured once, as training starts: then
    accelerate has prepared the model (FSDP2 shards a model only together with its optimizer, so the Trainer
    cannot evaluate one before). A resumed run reads it back, since by then the model is the checkpoint's.
    Returns a dict that holds {name: value} once trainer.train has begun."""
    from transformers import TrainerCallback

    path, figure = out / BEFORE, {}

    class MeasureFirst(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if checkpoint and path.is_file():
                saved = read_json(path, BEFORE_FIX)
                if name not in saved:
                    raise RlftError(f"'{path}' is damaged (no '{name}'): {BEFORE_FIX}")
                figure[name] = saved[name]  # a number: last_checkpoint checked
                return
            figure[name] = measure()  # every process: a collective under FSDP
            if is_main_process():
                write_json(path, figure)
            log.info("before training: %s %.4f", name, figure[name])

    trainer.add_callback(MeasureFirst)
    return figure


def keep_trainable_float32(model) -> None:
    """Undo TRL's cast of a quantized model's trainable weights to bf16 (the QLoRA paper's recipe), right after
    the trainer is built: master weights and optimiser state stay float32, and a score head matches the float32
    compute (in bf16 it fails on the first forward)."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()


def train(trainer, checkpoint: str | None) -> None:
    """trainer.train, resuming from `checkpoint`; a checkpoint holding code instead of tensors is refused."""
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
        check_checkpoint(Path(checkpoint))
        log.info("resuming from %s", checkpoint)
    try:
        with reading(checkpoint, RESUME_FIX) if checkpoint else nullcontext():
            trainer.train(resume_from_checkpoint=checkpoint)
    except pickle.UnpicklingError as e:  # the Trainer loads optimizer/RNG states with weights_only=True
        raise unsafe_checkpoint(checkpoint, e) from None


RESUME_FIX = "delete it to resume from the one before, or set resume=false"
# What a Trainer checkpoint must hold to continue exactly: weights (adapter or full model), optimizer (under
# FSDP accelerate writes optimizer.bin, or a folder of shards), scheduler, RNG (one file per process) and the
# trainer's state.
CHECKPOINT_FILES = (("adapter_model.safetensors", "model.safetensors"), ("optimizer.pt", "optimizer.bin", "optimizer_0"),
                    ("scheduler.pt",),
                    ("rng_state.pth", "rng_state_0.pth"), ("trainer_state.json",))


def check_checkpoint(folder: Path) -> None:
    """Refuse, in one line and before anything is written, a checkpoint marked complete that cannot continue the
    run exactly: a file missing (without optimizer.pt the Trainer silently starts a fresh optimizer), or one that
    does not parse (torn torch or safetensors files, edited JSON), or that holds code instead of tensors."""
    from safetensors import safe_open
    from transformers.trainer_pt_utils import safe_globals  # the numpy types the Trainer's RNG file holds

    for names in CHECKPOINT_FILES:
        if not any((folder / name).exists() for name in names):
            raise RlftError(f"checkpoint '{folder}' has no {' or '.join(names)}, so it cannot continue the run "
                            f"exactly: {RESUME_FIX}")
    read_json(folder / "trainer_state.json", RESUME_FIX)
    for path in sorted(folder.iterdir()):
        try:
            with reading(path, RESUME_FIX):
                if path.suffix == ".safetensors":
                    with safe_open(path, framework="pt") as weights:
                        weights.keys()
                elif path.suffix in (".pt", ".pth") or path.name in ("optimizer.bin", "pytorch_model_fsdp.bin"):
                    with safe_globals():  # what the Trainer allows when it loads them
                        torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            raise unsafe_checkpoint(folder, e) from None


def check_finite_losses(log_history: list[dict]) -> None:
    for entry in log_history:
        if "loss" in entry and not math.isfinite(entry["loss"]):
            raise RlftError(
                f"training loss became {entry['loss']} at step {entry.get('step')}: lower train.learning_rate "
                "or use model.dtype=float32; the last good checkpoint is kept in output_dir/checkpoints"
            )
