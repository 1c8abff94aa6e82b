"""Stage 1, `rlft sft`: supervised LoRA / QLoRA fine-tuning of a causal LM on TRL's SFTTrainer.

setup (config, data, model + adapter) -> eval loss before -> train (resumable) -> eval loss after -> save
adapter, tokenizer, resolved config and metrics (metrics.json last: it marks the run complete).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rlft import runs
from rlft.config import DataConfig, LoraConfig, ModelConfig, option, require, require_seed, section
from rlft.data import load_splits, prompts_of, render_prompts, require_chat_template, to_prompt_completion
from rlft.errors import RlftError
from rlft.generation import SamplingConfig, sample
from rlft import hf_training
from rlft.hf_training import RESUMABLE_CHANGES, TrainConfig, last_checkpoint, training_kwargs
from rlft.models import add_lora, context_length, count_parameters, load_model, load_tokenizer
from rlft.distributed import is_main_process
from rlft.policy import adapter_state_dict, save_adapter
from rlft.publish import Publishing, push, write_model_card

log = logging.getLogger(__name__)


@dataclass
class SFTConfig(Publishing):
    output_dir: str = option("runs/sft", "Where the adapter, tokenizer, config, metrics and logs go.")
    seed: int = option(0, "Seed for data order, hold-out split, LoRA init and dropout.")
    resume: bool = option(True, "Continue from the last checkpoint in output_dir if there is one.")
    completion_only_loss: bool = option(
        True, "Train on completion tokens only (prompt-completion rows; `messages` rows: the last reply)."
    )
    merge: bool = option(False, "Also save the base with the adapter merged in, to output_dir/merged.")
    num_samples: int = option(3, "Held-out prompts to generate from after training (saved in metrics.json).")
    model: ModelConfig = section(ModelConfig, "The base model.")
    lora: LoraConfig = section(LoraConfig, "The trained adapter.")
    data: DataConfig = section(DataConfig, "Training data: messages, prompt+completion, or text rows.")
    train: TrainConfig = section(TrainConfig, "Optimisation.")

    def __post_init__(self):
        super().__post_init__()
        require_seed(self.seed)
        require(self.num_samples >= 0, "num_samples", "must be >= 0")


def run(config: SFTConfig) -> dict:
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    started = time.time()
    runs.seed_everything(config.seed)
    checkpoint = last_checkpoint(config.output_dir) if config.resume else None
    out = runs.prepare(config.output_dir, config, "sft", resuming=checkpoint is not None,
                       may_change=RESUMABLE_CHANGES)
    main = is_main_process()  # under `accelerate launch` the one process that writes the run's files

    # Data first: a wrong column should fail before minutes of model loading.
    train_data, eval_data, data_format = load_splits(
        config.data, ("conversational", "prompt_completion", "text"), config.seed, "SFT data"
    )
    data = runs.check_data(out, config.data.path, train_data, eval_data, resuming=checkpoint is not None)
    if data_format == "conversational" and config.completion_only_loss:
        train_data, eval_data = to_prompt_completion(train_data), to_prompt_completion(eval_data)
    hf_training.check_train(config.train)
    tokenizer = load_tokenizer(config.model)
    if any(isinstance(value, list) for value in train_data[0].values()):  # message lists
        require_chat_template(tokenizer, config.model.name_or_path)
    model = add_lora(load_model(config.model), config.model, config.lora)
    trainable, total = count_parameters(model)
    log.info("LoRA: %.2fM trainable of %.1fM parameters", trainable / 1e6, total / 1e6)
    # Rows past the model's positions would crash absolute-position models and silently leave RoPE
    # models' trained range: cut them at the context.
    max_length = min(config.train.max_length, context_length(model) or config.train.max_length)
    if max_length < config.train.max_length:
        log.info("train.max_length=%d is beyond the model's context: rows are cut at %d tokens",
                 config.train.max_length, max_length)

    args = TrlSFTConfig(
        **{**training_kwargs(config.train, model, out, config.seed), "max_length": max_length},
        completion_only_loss=config.completion_only_loss if data_format != "text" else None,
        dataset_num_proc=1,
        # Batches of similar length: on the quickstart's dialog pairs half of a random batch was padding.
        train_sampling_strategy="group_by_length",
    )
    trainer_class = with_model_loss(SFTTrainer) if model.device.type == "cpu" else SFTTrainer
    trainer = hf_training.build_trainer(trainer_class, model, args, train_data, eval_data, tokenizer)
    if len(trainer.train_dataset) == 0:  # TRL drops the rows it has nothing left of to train on
        raise RlftError(no_completion_within(config, "training"))
    fitted = hf_training.fit(trainer, out, config, data, checkpoint, "eval_loss", lambda: eval_loss(trainer, config))

    weights = adapter_state_dict(model)  # every process: gathered from the shards under FSDP
    samples = sample_completions(model, tokenizer, eval_data, config.num_samples)
    if not main:
        return {}
    save_adapter(model, out, config.model, reference_adapter=None, state_dict=weights)
    tokenizer.save_pretrained(out)
    if config.merge:
        save_merged(config.model, out)
    metrics = runs.stage_metrics({
        **fitted,
        "train_rows": len(train_data),
        "eval_rows": len(eval_data),
        "steps": trainer.state.global_step,
        "trainable_parameters": trainable,
        "samples": samples,
    }, started)
    write_model_card(out, title=f"SFT adapter for {config.model.name_or_path}", base_model=config.model.name_or_path,
                     lineage=[config.model.name_or_path, "sft"], config=config, metrics=metrics, tags=["sft", "lora"])
    runs.write_json(out / runs.METRICS, metrics)
    push(out, config)
    return metrics


def eval_loss(trainer, config: SFTConfig) -> float:
    """Held-out loss; none at all when every held-out completion lies past the length cut."""
    loss = trainer.evaluate().get("eval_loss")
    if loss is None or not math.isfinite(loss):
        raise RlftError(no_completion_within(config, "held-out"))
    return loss


def no_completion_within(config: SFTConfig, split: str) -> str:
    return (f"no {split} row keeps a completion token within train.max_length={config.train.max_length} (the "
            "prompts fill it, or the model's context is shorter): raise train.max_length or shorten the prompts")


def save_merged(model_config: ModelConfig, out: Path) -> None:
    """Merge into a freshly loaded full-precision base: merging into 4-bit weights would lose precision."""
    from peft import PeftModel

    base = load_model(replace(model_config, quantization="none"), device="cpu")
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    merged.save_pretrained(out / "merged")
    load_tokenizer(model_config).save_pretrained(out / "merged")


def with_model_loss(trainer_class):
    """`trainer_class` (TRL's SFTTrainer) with the model's own causal-LM loss on the collator's labels (-100 off
    the completion): HF Trainer's compute_loss. TRL's default patches in a fused LM head that recomputes every
    position's logits in float32 chunks to also log entropy and top-1 accuracy: on a CPU that head took 45% of a
    bf16 SFT step on SmolLM2 (torch profiler, 6 steps of configs/sft.yaml), and configs/sft.yaml trained in 205 s
    instead of 231 (float32) and 178 instead of 215 (bf16; benchmarks/sft_dtype.py). Used on CPU only: on a GPU
    the fused head saves memory (no (batch, length, vocab) logits) and runs compact. Those two metrics go; the
    loss is the same mean over completion tokens."""
    from transformers import Trainer

    class ModelLoss(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return ModelLoss


def sample_completions(model, tokenizer, eval_data, count: int) -> list[dict]:
    """Greedy completions of the first held-out prompts: a quick look at what training did."""
    if count == 0 or "prompt" not in eval_data.column_names:
        return []
    prompts = prompts_of(eval_data.select(range(min(count, len(eval_data)))))
    batches = sample(model, tokenizer, render_prompts(tokenizer, prompts), SamplingConfig(), 16, greedy=True)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, (t for b in batches for t in b.texts))]
