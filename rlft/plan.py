"""`rlft plan` and every stage's `--dry-run`: check a run's inputs in seconds, and say how much memory it needs.

What a stage would otherwise find wrong after minutes of loading is checked here with no weights loaded: the
tokenizer and a sample of the data, the prompts through the chat template, the model built from its config
alone on the meta device (the LoRA targets matched by add_lora, the code training runs; the context against
the prompt, response and row lengths), the scorers (a function imports, a model folder holds weights) and the
output folder (writable, no other stage's run; nothing is created). Every problem is one line naming its fix,
and the checks after it still run. Then the memory of one process (rlft/memory.py) against the device's
(rlft/fit.py).

A pipeline is planned stage by stage, in order: what an earlier stage will write (the SFT adapter, the pairs,
the reward model) is sized from that stage's config instead of being looked for on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from reward_models.preferences import PreferenceConfig
from reward_models.scorers import AdapterScorer, ScorerConfig, check_scorer, check_scorers, length_limit
from reward_models.train import RewardConfig, tokenize_pairs
from rlft import hf_training, memory, runs
from rlft.activations import bytes_per_token_layer
from rlft.config import LoraConfig, ModelConfig
from rlft.data import load_splits, prompts_of, render_prompts, require_chat_template
from rlft.dpo import DPOConfig
from rlft.errors import RlftError
from rlft.evaluate import EvalConfig, check_same_base, find_adapter, find_checkpoints, load_prompts
from rlft.fit import Device, device_of, knobs, render, sampling_knobs, write_json
from rlft.generation import check_prompt_lengths, packing_supported
from rlft.models import add_lora, count_parameters, empty_model, load_tokenizer, peft_error, positions_of, resolve
from rlft.models import torch_dtype
from rlft.pipeline import PipelineConfig, check_reusable, wire
from rlft.policy import adapter_info, check_adapter_base
from rlft.ppo.config import PPOConfig
from rlft.sft import SFTConfig

SAMPLE_ROWS = 4096  # data rows checked and measured. Training batches rows of like length, the longest first, so
# the data's longest row sets the peak: a split of fewer rows is read whole, a longer one planned at max_length.


@dataclass
class Setting:
    """What every stage of one plan shares."""
    device: Device
    processes: int = 1
    strategy: str = "ddp"
    made: dict[str, object] = field(default_factory=dict)  # folder -> config of the pipeline stage that writes it

    def maker(self, path: str | Path):
        """The config of the earlier pipeline stage that will write `path` (not written yet), else None."""
        return self.made.get(str(Path(path).resolve())) if str(path).strip() else None


@dataclass
class StagePlan:
    """One stage's problems (a line each), notes, and the workload of one of its processes."""
    stage: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    workload: memory.Workload | None = None
    knobs: list[tuple[str, memory.Workload]] = field(default_factory=list)  # (setting to change, workload with it)

    def check(self, function, *args, **kwargs):
        """function(*args, **kwargs); or None, its RlftError kept as a problem, so that later checks still run."""
        try:
            return function(*args, **kwargs)
        except RlftError as e:
            if str(e) not in self.problems:  # two checks of one input (a missing folder) say it once
                self.problems.append(str(e))
            return None


def run(stage: str, config, device: str | None = None, processes: int = 1, strategy: str = "ddp",
        json_path: str | None = None) -> list[StagePlan]:
    """Check `stage`'s config and print its memory plan (a pipeline's stage by stage), also as JSON to `json_path`;
    every problem found is a line of the one RlftError raised at the end."""
    if processes < 1:
        raise RlftError(f"--processes {processes}: must be >= 1")
    setting = Setting(device_of(device), processes, strategy)
    plans = plan_pipeline(config, setting) if stage == "pipeline" else [PLANNERS[stage](config, setting)]
    if json_path:
        write_json(json_path, plans, setting)
    print("\n\n".join(render(plan, setting) for plan in plans if plan.stage != "pipeline" or plan.notes))
    if stage == "pipeline" and len(plans) > 2:
        peaks = {plan.stage: memory.peak(memory.parts(plan.workload)) for plan in plans if plan.workload}
        if peaks:
            busiest = max(peaks, key=peaks.get)
            print(f"\npipeline: its stages run one after another in one process: its peak is {busiest}'s, "
                  f"{peaks[busiest] / memory.MIB:,.0f} MiB")
    problems = [line if stage != "pipeline" or line.startswith("[") else f"[{plan.stage}] {line}"
                for plan in plans for line in plan.problems]
    if problems:
        raise RlftError("\n".join(problems))
    return plans


# ---------------------------------------------------------------------------------------------------
# Stages


def plan_sft(config: SFTConfig, setting: Setting) -> StagePlan:
    plan = StagePlan("sft")
    plan.check(hf_training.check_train, config.train)
    tokenizer = plan.check(load_tokenizer, config.model)
    sampled = plan.check(sample, config.data, ("conversational", "prompt_completion", "text"), "SFT data",
                         config.seed)
    lengths = plan.check(row_lengths, tokenizer, sampled, config.model.name_or_path) if tokenizer and sampled else None
    policy = plan.check(size_policy, config.model, config.lora)
    plan.check(runs.check_output_dir, config.output_dir, "sft")
    if policy is None:
        return plan
    shape, adapter, _, context = policy
    max_length = min(config.train.max_length, context or config.train.max_length)
    if max_length < config.train.max_length:  # as training does: said, not refused
        plan.notes.append(f"train.max_length={config.train.max_length} is past the model's context: rows are cut at "
                          f"{max_length} tokens")
    whole = lengths and len(lengths) < SAMPLE_ROWS
    tokens = min(max(lengths), max_length) if whole else max_length
    plan.notes.append(describe_model(config.model, shape, setting, adapter, context))
    plan.notes.append(f"rows: {config.train.batch_size} per micro-batch of up to {tokens} tokens" + (
        f" (the longest of the data's {len(lengths)} rows)" if whole else " (train.max_length" + (
            f"; the longest of the first {len(lengths)} rows has {max(lengths)})" if lengths else ")")))
    plan.workload = memory.Workload(
        shape, dtype_bytes(config.model, setting.device), config.model.quantization, adapter=adapter, trains=True,
        optim=config.train.optim, rows=config.train.batch_size, tokens=tokens,
        per_token_layer=layer_bytes(plan, empty_model(config.model), config.model, config.lora, setting),
        gradient_checkpointing=config.model.gradient_checkpointing, logit_rows=config.train.batch_size,
        logit_tokens=tokens, logit_copies=memory.CAUSAL_LM_LOSS_LOGIT_COPIES, processes=setting.processes,
        strategy=setting.strategy, device=setting.device.kind)
    plan.knobs = knobs(plan.workload, config.train.gradient_accumulation_steps,
                       lambda rows, steps: f"train.batch_size={rows} train.gradient_accumulation_steps={steps}")
    return plan


def plan_reward(config: RewardConfig, setting: Setting) -> StagePlan:
    from transformers import AutoModelForSequenceClassification  # heavy

    plan = StagePlan("reward")
    plan.check(hf_training.check_train, config.train)
    tokenizer = plan.check(load_tokenizer, config.model)
    pairs_made = setting.maker(Path(config.data.path).parent)
    sampled = None if pairs_made else plan.check(sample, config.data, ("preference",), "reward data",
                                                      config.seed)
    if config.sft_adapter and not setting.maker(config.sft_adapter):
        plan.check(check_adapter_base, config.sft_adapter, config.model)
    model = plan.check(empty_model, config.model, AutoModelForSequenceClassification, num_labels=1)
    plan.check(runs.check_output_dir, config.output_dir, "reward")
    if model is None:
        return plan
    shape = shape_of(model)
    max_length = length_limit(model, tokenizer, config.train.max_length) if tokenizer else config.train.max_length
    tokens = max_length
    if sampled is not None and tokenizer is not None and len(sampled[0]) < SAMPLE_ROWS:  # every pair
        pairs = tokenize_pairs(sampled[0], tokenizer, max_length)
        tokens = max(len(ids) for column in ("chosen_ids", "rejected_ids") for ids in pairs[column])
    adapter = 0
    if config.lora_enabled:
        adapter = plan.check(adapter_size, model, config.model, config.lora, "SEQ_CLS")
        if adapter is None:
            return plan
        adapter = adapter[0]
    plan.notes.append(describe_model(config.model, shape, setting, adapter, positions_of(model.config)))
    plan.notes.append(f"rows: {config.train.batch_size} pairs per micro-batch, chosen and rejected in one pass, of up "
                      f"to {tokens} tokens" + (" (pairs written by the preferences stage: train.max_length)"
                                               if pairs_made else ""))
    plan.workload = memory.Workload(
        shape, dtype_bytes(config.model, setting.device), config.model.quantization, adapter=adapter, trains=True,
        full_finetune=not config.lora_enabled, optim=config.train.optim, rows=2 * config.train.batch_size,
        tokens=tokens, per_token_layer=layer_bytes(
            plan, empty_model(config.model, AutoModelForSequenceClassification, num_labels=1), config.model,
            config.lora if config.lora_enabled else None, setting, "SEQ_CLS"),
        gradient_checkpointing=config.model.gradient_checkpointing, processes=setting.processes,
        strategy=setting.strategy, device=setting.device.kind)
    plan.knobs = knobs(plan.workload, config.train.gradient_accumulation_steps,
                       lambda pairs, steps: f"train.batch_size={pairs} train.gradient_accumulation_steps={steps}",
                       rows_per_item=2)
    return plan


def plan_dpo(config: DPOConfig, setting: Setting) -> StagePlan:
    plan = StagePlan("dpo")
    plan.check(hf_training.check_train, config.train)
    tokenizer = plan.check(load_tokenizer, config.model)
    pairs_made = setting.maker(Path(config.data.path).parent)
    sampled = None if pairs_made else plan.check(sample, config.data, ("preference",), "DPO pairs", config.seed)
    if sampled is not None and tokenizer is not None and not isinstance(sampled[0][0]["chosen"], str):
        plan.check(require_chat_template, tokenizer, config.model.name_or_path)  # message lists, as training renders
    if config.sft_adapter and not setting.maker(config.sft_adapter):
        plan.check(check_adapter_base, config.sft_adapter, config.model)
    policy = plan.check(size_policy, config.model, config.lora)
    plan.check(runs.check_output_dir, config.output_dir, "dpo")
    if policy is None:
        return plan
    shape, adapter, _, context = policy
    tokens = min(config.train.max_length, context or config.train.max_length)
    if sampled is not None and tokenizer is not None and len(sampled[0]) < SAMPLE_ROWS:  # every pair, as scored
        pairs = tokenize_pairs(sampled[0], tokenizer, tokens)
        tokens = max(len(ids) for column in ("chosen_ids", "rejected_ids") for ids in pairs[column])
    plan.notes.append(describe_model(config.model, shape, setting, adapter, context))
    plan.notes.append(f"rows: {config.train.batch_size} pairs per micro-batch, chosen and rejected in one pass (and "
                      f"one more without gradients for the reference), of up to {tokens} tokens")
    # TRL's DPO takes log-probs through a fused head: the logits of a few rows at a time, never the whole batch's
    plan.workload = memory.Workload(
        shape, dtype_bytes(config.model, setting.device), config.model.quantization, adapter=adapter, trains=True,
        optim=config.train.optim, rows=2 * config.train.batch_size, tokens=tokens,
        per_token_layer=layer_bytes(plan, empty_model(config.model), config.model, config.lora, setting),
        gradient_checkpointing=config.model.gradient_checkpointing, processes=setting.processes,
        strategy=setting.strategy, device=setting.device.kind)
    plan.knobs = knobs(plan.workload, config.train.gradient_accumulation_steps,
                       lambda pairs, steps: f"train.batch_size={pairs} train.gradient_accumulation_steps={steps}",
                       rows_per_item=2)
    return plan


def plan_preferences(config: PreferenceConfig, setting: Setting) -> StagePlan:
    plan = StagePlan("preferences")
    plan.check(check_scorers, config.judge)
    judges = [plan.check(size_scorer, judge, setting) for judge in config.judge]
    made = setting.maker(config.policy)
    if made is not None:  # the pipeline's SFT adapter
        model_config, adapter = made.model, made.lora
    elif config.policy:
        recorded = plan.check(adapter_info, config.policy, config.model.trust_remote_code)
        model_config, adapter = (recorded[0], config.policy) if recorded else (None, None)
    else:
        model_config, adapter = config.model, None
    if model_config is None:
        return plan
    prompt_tokens = sampled_prompt_lengths(plan, model_config, config.data, config.sampling, config.seed)
    policy = plan.check(size_policy, model_config, adapter)
    plan.check(runs.check_output_dir, config.output_dir, "preferences")
    if policy is None:
        return plan
    shape, adapter_parameters, merged, context = policy
    generate_tokens = prompt_tokens + config.sampling.max_new_tokens
    plan.notes.append(describe_model(model_config, shape, setting, adapter_parameters, context))
    plan.notes.append(f"sampling: {config.batch_size} rows at once, up to {generate_tokens} tokens "
                      f"({prompt_tokens} of prompt + {config.sampling.max_new_tokens} new)")
    plan.workload = memory.Workload(
        shape, dtype_bytes(model_config, setting.device), model_config.quantization, adapter=adapter_parameters,
        generate_rows=config.batch_size, generate_tokens=generate_tokens,
        **sampling_copies(model_config, config.sampling, setting, adapter, merged, shape),
        others=tuple(part for part in judges if part), device=setting.device.kind)
    plan.knobs = sampling_knobs(plan.workload)
    one_process(plan, setting)
    return plan


def plan_ppo(config: PPOConfig, setting: Setting) -> StagePlan:
    plan = StagePlan("ppo")
    hp = config.ppo
    plan.check(check_scorers, config.reward)
    plan.check(hf_training.check_optimizer, hp.optim, "ppo.optim")
    prompt_tokens = sampled_prompt_lengths(plan, config.model, config.data, config.sampling, config.seed)
    if config.sft_adapter and not setting.maker(config.sft_adapter):
        plan.check(check_adapter_base, config.sft_adapter, config.model)
    for scorer in config.reward:  # an adapter on PPO's base must have been trained on it (AdapterScorer's check)
        if scorer.kind == "adapter" and not setting.maker(scorer.path):
            reward_adapter = plan.check(AdapterScorer, scorer)
            if reward_adapter is not None:
                plan.check(reward_adapter.check_base, config.model, config.sft_adapter or None)
    rewards = [plan.check(size_scorer, scorer, setting, shared_base=True) for scorer in config.reward]
    policy = plan.check(size_policy, config.model, config.lora)
    plan.check(runs.check_output_dir, config.output_dir, "ppo")
    if policy is None:
        return plan
    shape, adapter, merged, context = policy
    critic = 0
    if hp.uses_critic:  # a value head on the hidden state, and with critic: adapter its own LoRA adapter too
        critic = shape.hidden + 1 + (adapter if hp.critic == "adapter" else 0)
    tokens = prompt_tokens + config.sampling.max_new_tokens
    plan.notes.append(describe_model(config.model, shape, setting, adapter, context)
                      + (f"; critic ({hp.critic}) {memory.amount(critic)}" if critic else ""))
    plan.notes.append(f"rows: {hp.rollout_batch_size} sampled at once, {hp.micro_batch_size} per update micro-batch, "
                      f"up to {tokens} tokens ({prompt_tokens} of prompt + {config.sampling.max_new_tokens} new)")
    if hp.gather_for_generation and setting.strategy == "fsdp":
        plan.notes.append("ppo.gather_for_generation: every process also holds the whole base while it samples")
    plan.workload = memory.Workload(
        shape, dtype_bytes(config.model, setting.device), config.model.quantization, adapter=adapter + critic,
        trains=True, optim=hp.optim, rows=hp.micro_batch_size, tokens=tokens,
        per_token_layer=layer_bytes(plan, empty_model(config.model), config.model, config.lora, setting),
        passes=2 if hp.uses_critic and hp.critic == "adapter" else 1,
        gradient_checkpointing=config.model.gradient_checkpointing,
        # step 3 keeps the policy's and the reference's logits of the response for the exact KL
        logit_rows=max(hp.micro_batch_size, hp.forward_batch_size), logit_tokens=config.sampling.max_new_tokens,
        logit_copies=2, generate_rows=hp.rollout_batch_size, generate_tokens=tokens,
        **sampling_copies(config.model, config.sampling, setting, config.lora, merged, shape),
        others=tuple(part for part in rewards if part), processes=setting.processes, strategy=setting.strategy,
        device=setting.device.kind)
    plan.knobs = knobs(plan.workload, hp.gradient_accumulation_steps,  # the micro-batch is mini_batch_size / steps
                       lambda rows, steps: f"ppo.gradient_accumulation_steps={steps} ppo.forward_batch_size={rows}")
    if hp.uses_critic and hp.critic == "adapter":
        plan.knobs.append(("ppo.critic=head", replace(plan.workload, adapter=adapter + shape.hidden + 1, passes=1)))
    return plan


def plan_eval(config: EvalConfig, setting: Setting) -> StagePlan:
    plan = StagePlan("eval")
    found, model_config, adapter = [], None, None
    for path in config.policies:
        made = setting.maker(path)
        if made is not None:  # a policy an earlier pipeline stage trains
            model_config, adapter = model_config or made.model, adapter or made.lora
        elif (policy := plan.check(find_adapter, path)) is not None:
            found.append(policy)
    if config.checkpoints_of and not setting.maker(config.checkpoints_of):
        found += plan.check(find_checkpoints, config.checkpoints_of) or []
    if found:
        plan.check(check_same_base, found)
        model_config = model_config or replace(found[0].model_config, trust_remote_code=config.trust_remote_code)
        adapter = adapter or str(found[0].folder)
    plan.check(check_scorers, config.scorers)
    scorers = [plan.check(size_scorer, scorer, setting) for scorer in config.scorers]
    prompts = (plan.check(load_prompts, config) or (None,))[0]
    plan.check(runs.check_output_dir, config.output_dir, "eval")
    if model_config is None:
        return plan
    tokenizer = plan.check(load_tokenizer, model_config)
    prompt_tokens = config.sampling.max_prompt_length
    if tokenizer is not None and prompts:
        texts = plan.check(render_prompts, tokenizer, prompts)
        lengths = plan.check(check_prompt_lengths, tokenizer, texts, config.sampling, model_config) if texts else None
        prompt_tokens = max(lengths) if lengths else prompt_tokens
    policy = plan.check(size_policy, model_config, adapter)
    if policy is None:
        return plan
    shape, adapter_parameters, merged, context = policy
    tokens = prompt_tokens + config.sampling.max_new_tokens
    plan.notes.append(describe_model(model_config, shape, setting, adapter_parameters, context))
    plan.notes.append(f"rows: {config.batch_size} sampled at once, up to {tokens} tokens")
    plan.workload = memory.Workload(
        shape, dtype_bytes(model_config, setting.device), model_config.quantization, adapter=adapter_parameters,
        # the KL pass: the policy's and the reference's logits of each response
        logit_rows=config.batch_size, logit_tokens=config.sampling.max_new_tokens, logit_copies=2,
        generate_rows=config.batch_size, generate_tokens=tokens,
        **sampling_copies(model_config, config.sampling, setting, adapter, merged, shape),
        others=tuple(part for part in scorers if part), device=setting.device.kind)
    plan.knobs = sampling_knobs(plan.workload)
    one_process(plan, setting)
    return plan


def plan_pipeline(config: PipelineConfig, setting: Setting) -> list[StagePlan]:
    """Each stage to run, in order; a finished one is reused as the pipeline reuses it, and what a stage to run
    will write is known to the stages after it (Setting.made)."""
    top = StagePlan("pipeline")
    stage_configs = top.check(wire, config)
    top.check(runs.check_output_dir, config.output_dir, "pipeline")
    plans = [top]
    for stage in config.stages if stage_configs else ():
        stage_config = stage_configs[stage]
        if runs.is_complete(stage_config.output_dir):
            plan = StagePlan(stage, notes=[f"complete in {stage_config.output_dir}: reused, nothing to load"])
            plan.check(check_reusable, stage, stage_config)
        else:
            plan = PLANNERS[stage](stage_config, setting)
            plan.knobs = [(in_section(change, stage), workload) for change, workload in plan.knobs]
            setting.made[str(Path(stage_config.output_dir).resolve())] = stage_config
        plans.append(plan)
    return plans


def in_section(change: str, stage: str) -> str:
    """A stage's `key=value` settings as a pipeline config spells them: `ppo.critic=head` is `ppo.ppo.critic=head`."""
    return " ".join(f"{stage}.{word}" if "=" in word and not word.startswith("-") else word for word in change.split())


PLANNERS = {"sft": plan_sft, "reward": plan_reward, "preferences": plan_preferences, "ppo": plan_ppo,
            "dpo": plan_dpo, "eval": plan_eval}


# ---------------------------------------------------------------------------------------------------
# Checks and sizes


def sample(data, allowed: tuple[str, ...], what: str, seed: int):
    """(the first SAMPLE_ROWS rows, format) of the rows the stage trains on (its hold-out and max_samples
    applied, with its seed), every row of the split checked as training checks."""
    rows, _, data_format = load_splits(data, allowed, seed, what)
    return rows.select(range(min(SAMPLE_ROWS, len(rows)))), data_format


def row_lengths(tokenizer, sampled, model_name: str) -> list[int]:
    """Tokens of each sampled SFT row as training renders it: message lists through the chat template, which a
    tokenizer without one cannot do (the same check as `rlft sft`'s)."""
    rows, _ = sampled
    if any(isinstance(value, list) for value in rows[0].values()):
        require_chat_template(tokenizer, model_name)
    texts = []
    for row in rows:
        if "messages" in row:
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif "text" in row:
            texts.append(row["text"])
        elif isinstance(row["prompt"], list):
            completion = row["completion"]
            reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            texts.append(tokenizer.apply_chat_template(row["prompt"] + reply, tokenize=False))
        else:
            texts.append(row["prompt"] + row["completion"])
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def sampled_prompt_lengths(plan: StagePlan, model_config: ModelConfig, data, sampling, seed: int) -> int:
    """The longest sampled prompt in tokens, through the chat template and checked against
    sampling.max_prompt_length and the model's context (as the sampling stages check them); that limit when the
    prompts could not be read."""
    tokenizer = plan.check(load_tokenizer, model_config)
    sampled = plan.check(sample, data, ("prompt_only", "conversational"), "prompt data", seed)
    if tokenizer is None or sampled is None:
        return sampling.max_prompt_length
    texts = plan.check(render_prompts, tokenizer, prompts_of(sampled[0]))
    lengths = plan.check(check_prompt_lengths, tokenizer, texts, sampling, model_config) if texts else None
    return max(lengths) if lengths else sampling.max_prompt_length


def shape_of(model) -> memory.ModelShape:
    """A meta-device model's sizes. Quantizable: the weights of the linear layers bitsandbytes converts, all but
    transformers' own list of modules it keeps (the output head, tied weights)."""
    from transformers.quantizers.base import get_keys_to_not_convert  # heavy

    kept = set(get_keys_to_not_convert(model))
    text = model.config.get_text_config()
    heads = getattr(text, "num_attention_heads", None) or 1
    return memory.ModelShape(
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        quantizable=sum(module.weight.numel() for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear) and name not in kept),
        layers=text.num_hidden_layers, hidden=text.hidden_size, vocab=text.vocab_size,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads)


def size_policy(model_config: ModelConfig, adapter: LoraConfig | str | None):
    """(shape, adapter parameters, parameters of the layers it adapts, context) of a causal LM with `adapter`
    (a config to train, or a saved adapter's folder), from the meta model: nothing is loaded."""
    model = empty_model(model_config)
    shape, context = shape_of(model), positions_of(model.config)
    if adapter is None:
        return shape, 0, 0, context
    return (shape, *adapter_size(model, model_config, adapter), context)


def adapter_size(model, model_config: ModelConfig, adapter: LoraConfig | str, task_type: str = "CAUSAL_LM"):
    """(adapter parameters, parameters of the base layers it adapts) of `adapter` put on the meta `model` by the
    code training runs: add_lora for a config (its target modules matched by peft, all-linear resolved as
    training resolves it: a wrong name is add_lora's own one line), or peft's config of a saved adapter. A reward
    adapter counts its score head too (trained in full)."""
    from accelerate import init_empty_weights  # heavy
    from peft import PeftConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if isinstance(adapter, LoraConfig):
        adapted = with_lora(model, model_config, adapter, task_type)
    else:
        saved = PeftConfig.from_pretrained(resolve(adapter))
        saved.inference_mode = False  # marks its parameters trainable: counted as add_lora's are
        try:
            with init_empty_weights():
                adapted = get_peft_model(model, saved)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise peft_error(e) from None
    adapted_layers = sum(layer.get_base_layer().weight.numel() for layer in adapted.modules()
                         if isinstance(layer, LoraLayer))
    return count_parameters(adapted)[0], adapted_layers


def with_lora(model, model_config: ModelConfig, lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    """The meta `model` with `lora` added by add_lora, the code training runs (its target modules matched by
    peft, all-linear resolved as training resolves it); quantization and checkpointing change no shape."""
    from accelerate import init_empty_weights  # heavy

    with init_empty_weights():
        return add_lora(model, replace(model_config, quantization="none", gradient_checkpointing=False), lora,
                        task_type)


def layer_bytes(plan: StagePlan, model, model_config: ModelConfig, adapter: LoraConfig | None, setting: Setting,
                task_type: str = "CAUSAL_LM") -> float:
    """Bytes per token a layer of the meta `model` keeps for the backward (rlft.activations), with `adapter`
    added as training adds it (none: the model trains in full); `model` is used up. A model whose forward fake
    tensors cannot run (data-dependent shapes, remote code) is planned without activations, and the plan says so."""
    if adapter is not None:
        model = with_lora(model, model_config, adapter, task_type)
    try:
        return bytes_per_token_layer(model, planned_dtype(model_config, setting.device),
                                     upcast_unquantized=model_config.quantization != "none")
    except Exception as e:  # the measurement's failure, not the run's: the rest of the plan still stands
        plan.notes.append(f"activations not measured ({type(e).__name__}: {' '.join(str(e).split())[:120]}): "
                          "the peak below leaves them out")
        return 0.0


def size_scorer(scorer: ScorerConfig, setting: Setting, shared_base: bool = False) -> tuple[str, str, float] | None:
    """(key, label, bytes) of a scorer as placed, after its checks (rlft's scorers make them before loading): an
    `adapter` on PPO's base (`shared_base`) adds its adapter alone, any other learned scorer its own model; a
    function, nothing (None)."""
    from transformers import AutoModelForSequenceClassification  # heavy

    made = setting.maker(scorer.path)
    if made is not None:  # the pipeline's reward stage will write it
        base = made.model if made.lora_enabled else replace(made.model, dtype=scorer.dtype)
        adapter = made.lora if made.lora_enabled else None
    else:
        base = check_scorer(scorer, shared_base)
        if base is None:
            return None
        adapter = scorer.path if (Path(resolve(scorer.path)) / "adapter_config.json").is_file() else None
    model = empty_model(base, AutoModelForSequenceClassification, num_labels=1)
    shape = shape_of(model)
    adapter_parameters = adapter_size(model, base, adapter, "SEQ_CLS")[0] if adapter else 0
    if scorer.kind == "adapter" and shared_base:
        return (f"reward:{scorer.name}", f"reward '{scorer.name}': adapter on the policy's base, "
                f"{memory.amount(adapter_parameters)} float32", adapter_parameters * memory.FLOAT32)
    size = memory.weight_bytes(shape.parameters, shape.quantizable, dtype_bytes(base, setting.device),
                               base.quantization) + adapter_parameters * memory.FLOAT32
    label = f"scorer '{scorer.name}': its own model, {memory.amount(shape.parameters)} {dtype_name(base, setting.device)}"
    return f"reward:{scorer.name}", label + (f" + {memory.amount(adapter_parameters)} adapter" if adapter else ""), size


def sampling_copies(model_config: ModelConfig, sampling, setting: Setting, adapter, merged: int,
                    shape: memory.ModelShape) -> dict[str, int]:
    """Base weights copied while sampling, as Workload fields: `merged`, the layers the adapter adapts where it
    merges (generation.merged_adapter); `packed`, on a CPU with oneDNN bf16 kernels, in bf16, the other linear
    layers' prepacked copies (generation.packed_linears: merged layers pack from their merged copy; at most every
    parameter in all; only the bf16 output head of a quantized base)."""
    merged = merged if mergeable(model_config, sampling, setting, adapter) else 0
    sharded = setting.strategy == "fsdp" and setting.processes > 1
    if not (sampling.pack_weights and setting.device.kind == "cpu" and packing_supported() and not sharded
            and planned_dtype(model_config, setting.device) == torch.bfloat16):
        return {"merged": merged, "packed": 0}
    if model_config.quantization != "none":
        return {"merged": 0, "packed": shape.vocab * shape.hidden}
    return {"merged": merged, "packed": shape.parameters - merged}


def mergeable(model_config: ModelConfig, sampling, setting: Setting, adapter) -> bool:
    """Whether sampling merges the adapter into a copy of the layers it adapts (generation.merged_adapter): a
    LoRA adapter that is not DoRA, on unquantized weights that FSDP does not shard."""
    plain_lora = adapter is not None and not (isinstance(adapter, LoraConfig) and (adapter.kind != "lora"
                                                                                  or adapter.use_dora))
    return (sampling.merge_adapter and plain_lora and model_config.quantization == "none"
            and not (setting.strategy == "fsdp" and setting.processes > 1))


def dtype_bytes(model_config: ModelConfig, device: Device) -> int:
    """Bytes per weight of the base as the run loads it on `device` (dtype auto resolved for it)."""
    return planned_dtype(model_config, device).itemsize


def dtype_name(model_config: ModelConfig, device: Device) -> str:
    return str(planned_dtype(model_config, device)).removeprefix("torch.")


def planned_dtype(model_config: ModelConfig, device: Device) -> torch.dtype:
    if model_config.dtype == "auto" and device.kind == "cuda" and not torch.cuda.is_available():
        return torch.bfloat16  # a GPU that is not here: every recent one multiplies bfloat16
    return torch_dtype(model_config, device.kind)


def one_process(plan: StagePlan, setting: Setting) -> None:
    if setting.processes > 1:
        plan.notes.append(f"runs as one process: --processes {setting.processes} does not apply")


def describe_model(model_config: ModelConfig, shape: memory.ModelShape, setting: Setting, adapter: int,
                   context: int | None) -> str:
    stored = {"none": dtype_name(model_config, setting.device), "4bit": "4-bit NF4", "8bit": "8-bit"}
    return (f"model: {model_config.name_or_path}, {memory.amount(shape.parameters)} parameters, "
            f"{stored[model_config.quantization]}, {shape.layers} layers, context {context or 'unknown'}"
            + (f"; adapter {memory.amount(adapter)}" if adapter else ""))
