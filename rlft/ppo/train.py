"""Stage 3, `rlft ppo`: PPO with a LoRA policy, its frozen reference (adapter off) and a reward scorer.

Read top to bottom: setup -> for each step: 1. generate, 2. score, 3. reference and values, 4. per-token
rewards, 5. advantages, 6. update, 7. KL controller, log, checkpoint -> save. The math is in core.py.
Runs as one process or under `accelerate launch` (DDP, or FSDP2 with the base sharded: rlft/distributed.py);
every process takes its own prompts.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import register_fsdp_forward_method
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from rlft import distributed, hf_training, runs
from rlft.data import columns_of, load_splits, prompts_of, render_prompts, rows_of
from rlft.errors import RlftError
from rlft.generation import OffPolicyError, check_prompt_lengths, off_policy, sample
from rlft.hacking import collapse
from rlft.metrics import MetricsLogger, timed
from rlft.models import add_lora, load_tokenizer
from rlft.policy import active_adapter, load_reference
from rlft.publish import push, write_model_card
from rlft.ppo import checkpoint, scale
from rlft.ppo.config import RESUMABLE_CHANGES, PPOConfig, PPOHyperparameters
from rlft.ppo.core import (AdaptiveKLController, FixedKLController, PIKLController, aggregate, entropy_bonus,
                           entropy_from_logits, frac_zero_std, gae, grpo_advantages, kl_penalty, kl_upper_bound,
                           logprob_gap, loss_mask, masked_mean, masked_var, masked_whiten, per_token_rewards,
                           policy_loss, reinforce_pp_advantages, rloo_advantages, truncated_importance_weights,
                           value_loss)
from rlft.ppo.model import PolicyWithValueHead
from rlft.ppo.rollout import FirstMiniBatch, Rollout, forward_passes, generate, score
from reward_models.scorers import adapter_scorers, build_scorer, require_columns

log = logging.getLogger(__name__)
__all__ = ["PPOConfig", "run"]
MEASURED_BATCHES = 4  # rollout batches of fresh prompts that measure the final policy (64 replies by default)
KLController = FixedKLController | AdaptiveKLController | PIKLController


def run(config: PPOConfig) -> dict:
    ppo = setup(config)
    runs.begin(ppo.out, config, ppo.data)  # from here on this run writes in its folder
    if ppo.start_step == 0 and ppo.accelerator.is_main_process:
        checkpoint.drop_candidate(ppo.out)
    progress = tqdm(range(ppo.start_step, config.ppo.steps), desc="ppo", initial=ppo.start_step,
                    total=config.ppo.steps, disable=not ppo.accelerator.is_main_process)
    for step in progress:
        metrics = ppo_step(ppo, step)
        progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}",
                             beta=f"{metrics['objective/kl_coef']:.3f}")
    return finish(ppo)


@dataclass
class PPORun:
    """What every step of a run shares, built once by `setup`."""

    config: PPOConfig
    accelerator: Accelerator
    out: Path
    data: dict  # the prompt rows' hash (rlft.runs.check_data)
    tokenizer: PreTrainedTokenizerBase
    prompts: list
    prompt_texts: list[str]  # the prompts through the chat template
    columns: dict[str, list]  # the data's other columns, by prompt (rlft.data.columns_of): for function scorers
    scorer: object
    actor_critic: PolicyWithValueHead  # unwrapped: sampling and step 3's no-grad passes
    model: torch.nn.Module  # prepared by accelerate: the update
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    kl_controller: KLController
    logger: MetricsLogger
    start_step: int
    checkpoint_kl: dict[int, float]  # the exact KL of the policy after s updates (checkpoint step-s), by s
    checkpoint_kl_upper: dict[int, float]  # its 95% upper bound (kl_upper_bound): what the budget reads
    parameters_mb: float  # this process's share of the weights, the largest of all processes
    started: float  # time.time() as the run began

    def rows_of(self, step: int) -> list[int]:
        """This process's prompts at `step`, each num_generations times in a row: a group, whole on one process."""
        hp = self.config.ppo
        return [i for i in prompt_batch(step, self.accelerator.process_index, self.accelerator.num_processes,
                                        hp.prompts_per_rollout, len(self.prompts), self.config.seed)
                for _ in range(hp.num_generations)]


def setup(config: PPOConfig) -> PPORun:
    """Prompts, scorer and optimizer name first, so bad input fails before the policy loads; then the four roles
    on one base, the optimizer, schedule and KL controller, and a checkpoint's state when resuming."""
    started = time.time()
    if not config.reward:
        raise RlftError("ppo needs a reward: set reward=[{kind: model, path: runs/reward}] or a module:function scorer")
    accelerator = distributed.accelerator()
    out = Path(config.output_dir)
    last = checkpoint.latest(out) if config.resume else None
    runs.prepare(out, config, "ppo", resuming=last is not None, may_change=RESUMABLE_CHANGES)
    runs.seed_everything(config.seed)  # same on every process: identical adapter and head init

    hf_training.check_optimizer(config.ppo.optim, "ppo.optim")
    tokenizer = load_tokenizer(config.model)
    train_data, _, _ = load_splits(config.data, ("prompt_only", "conversational"), config.seed, "prompt data")
    prompts = prompts_of(train_data)
    data = runs.check_data(out, config.data.path, train_data, resuming=last is not None)
    prompt_texts = render_prompts(tokenizer, prompts)
    check_prompt_lengths(tokenizer, prompt_texts, config.sampling, config.model)
    scorer = build_scorer(config.reward, accelerator.device, shared_base=True)
    columns = columns_of(train_data)
    require_columns(scorer, columns, config.data.path)
    actor_critic = build_actor_critic(config, tokenizer, scorer, accelerator.device)
    optimizer = build_optimizer(actor_critic, config.ppo)
    scheduler = build_scheduler(optimizer, config.ppo)
    kl_controller = build_kl_controller(config.ppo)

    start_step, checkpoint_kl, checkpoint_kl_upper = 0, {}, {}
    if last is not None:
        state = checkpoint.load(last, accelerator.process_index, actor_critic.policy, actor_critic.value_head)
        scheduler.load_state_dict(state["scheduler"])
        kl_controller.load_state_dict(state["kl_controller"])
        start_step, checkpoint_kl = state["step"], dict(state.get("checkpoint_kl", {}))
        checkpoint_kl_upper = dict(state.get("checkpoint_kl_upper", checkpoint_kl))
        log.info("resumed from %s (step %d)", last, start_step)
    else:
        torch.manual_seed(config.seed + 1000 * accelerator.process_index)  # distinct samples per process
    model, optimizer = accelerator.prepare(actor_critic, optimizer)
    if last is not None:  # after prepare: under FSDP the optimizer's state is sharded like its parameters
        checkpoint.load_optimizer(model, optimizer, state["optimizer"])
    for method in ("sampling_loop", "reference_logprobs"):  # FSDP2 gathers around these as around forward
        register_fsdp_forward_method(model, method)
    parameters_mb = accelerator.gather(torch.tensor([distributed.parameter_bytes(model) / 2**20])).max().item()
    return PPORun(config, accelerator, out, data, tokenizer, prompts, prompt_texts, columns, scorer, actor_critic,
                  model, optimizer, scheduler, kl_controller, MetricsLogger(out, start_step, accelerator.is_main_process),
                  start_step, checkpoint_kl, checkpoint_kl_upper, parameters_mb, started)


def ppo_step(ppo: PPORun, step: int) -> dict:
    """One PPO step, steps 1-7, then its metrics and checkpoint. Returns the metrics it logged."""
    config, hp, accelerator = ppo.config, ppo.config.ppo, ppo.accelerator
    started, cpu_started = time.perf_counter(), time.process_time()
    times: dict[str, float] = {}
    rows = ppo.rows_of(step)

    # 1. generate
    with timed(times, "generate"):
        rollout = generate(ppo.actor_critic, ppo.tokenizer, [ppo.prompts[i] for i in rows],
                           [ppo.prompt_texts[i] for i in rows], config.sampling, rows_of(ppo.columns, rows))
    # 2. score
    with timed(times, "score"):
        score(rollout, ppo.scorer, hp.missing_eos_penalty, hp.score_clip)
    # The update's first mini-batch, drawn now (nothing between here and the update draws random numbers, so the
    # stream is what it would be there): its forward is step 3's for those rows, done once.
    order = epoch_order(len(rows), hp.num_generations)
    fold = order[:hp.mini_batch_size] if hp.gradient_accumulation_steps == 1 else None

    # 3. policy log-probs and values (the first mini-batch's with autograd on), reference log-probs, exact KL
    with timed(times, "forward"):
        first = FirstMiniBatch(order, forward_passes(ppo.actor_critic, rollout, hp.forward_batch_size, ppo.model, fold))
    gap = check_sampler(rollout, accelerator, hp.max_sampler_gap, config.model.name_or_path, step + 1)
    sampler_stats = {f"sampler/logprob_gap_{key}": value for key, value in gap.items()}
    # the exact KL of the policy the rollout sampled from: what the controller steers; the budget reads its bound
    mean_kl, kl_upper = kl_measured(rollout, accelerator)
    # the policy saved at the end of the previous step
    ppo.checkpoint_kl[step], ppo.checkpoint_kl_upper[step] = mean_kl, kl_upper
    # a policy within the budget that no checkpoint holds: kept before the update changes it (unless the run would
    # stop at max_kl before passing the budget)
    if step % config.save_every and kl_upper <= hp.kl_budget < hp.max_kl:
        checkpoint.save_candidate(accelerator, ppo.out, step, mean_kl, kl_upper, ppo.actor_critic, config.model,
                                  config.sft_adapter or None)

    # 4. per-token rewards: -beta * KL on every token (unless the KL goes in the loss), the score on the last
    beta = ppo.kl_controller.value
    kl_coef_in_reward = beta if hp.kl_in == "reward" else 0.0
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, hp.kl_estimator)
    rewards, sampled_kl = per_token_rewards(rollout.scores, kl, kl_coef_in_reward, rollout.response_mask)
    if hp.whiten_rewards:
        rewards = masked_whiten(rewards, rollout.response_mask, shift_mean=False)

    # 5. advantages and returns (returns train the critic: gae only)
    rollout.advantages, rollout.returns = estimate_advantages(rewards, rollout, hp)
    if hp.sampler_correction_cap:  # the tokens came from the sampler's distribution: reweight to PPO's
        weights = truncated_importance_weights(rollout.logprobs, rollout.sampler_logprobs, rollout.response_mask,
                                               hp.sampler_correction_cap)
        rollout.advantages = rollout.advantages * weights
        sampler_stats["sampler/correction_capped"] = accelerator.reduce(
            masked_mean((weights >= hp.sampler_correction_cap).float(), rollout.response_mask), "mean").item()

    # 6. update: several epochs of clipped policy and value losses over mini-batches
    with timed(times, "update"):
        update_stats = ppo_update(ppo.model, accelerator, ppo.optimizer, rollout, hp, beta, first)
        del first  # its graph was freed by backward; the tensors go too
        ppo.scheduler.step()
    # before NaN weights reach a checkpoint
    check_finite_weights(ppo.optimizer, accelerator, step + 1, ppo.out, ppo.actor_critic, rollout.query_mask)

    # 7. KL controller, on step 3's exact KL of all processes' samples so beta stays identical everywhere
    ppo.kl_controller.update(mean_kl, hp.rollout_batch_size * accelerator.num_processes)

    penalty = kl_coef_in_reward * sampled_kl if hp.kl_in == "reward" else None
    metrics = step_metrics(accelerator, rollout, sampled_kl, penalty, beta, mean_kl, update_stats, hp.uses_critic,
                           hp.num_generations)
    metrics.update(sampler_stats)
    metrics.update(times)
    metrics["time/step"] = time.perf_counter() - started
    # CPU seconds of this process (all threads): far steadier than wall time on a shared machine
    metrics["time/cpu_step"] = time.process_time() - cpu_started
    metrics["perf/samples_per_s"] = len(rows) * accelerator.num_processes / metrics["time/step"]
    metrics["perf/tokens_per_s"] = metrics["response/length"] * metrics["perf/samples_per_s"]
    metrics["lr"] = ppo.scheduler.get_last_lr()[0]
    ppo.logger.log(step + 1, metrics)
    if (step + 1) % config.sample_every == 0 or step == ppo.start_step:
        ppo.logger.samples(step + 1, rollout)

    if not math.isfinite(mean_kl) or mean_kl > hp.max_kl:
        raise RlftError(
            f"mean KL per sequence reached {mean_kl:.1f} > ppo.max_kl={hp.max_kl} at step {step + 1}: the policy ran "
            f"away from its reference; lower ppo.learning_rate or raise ppo.kl_coef (last checkpoint kept in "
            f"{ppo.out / 'checkpoints'})"
        )
    if (step + 1) % config.save_every == 0 or step + 1 == hp.steps:
        trainer_state = {"optimizer": checkpoint.optimizer_state(ppo.model, ppo.optimizer),
                         "scheduler": ppo.scheduler.state_dict(), "kl_controller": ppo.kl_controller.state_dict(),
                         "checkpoint_kl": ppo.checkpoint_kl, "checkpoint_kl_upper": ppo.checkpoint_kl_upper,
                         "step": step + 1, "processes": accelerator.num_processes}
        checkpoint.save(accelerator, ppo.out, step + 1, ppo.actor_critic, trainer_state, config.model,
                        config.sft_adapter or None)
    return metrics


def finish(ppo: PPORun) -> dict:
    """The result: the final policy, or the latest earlier one within the KL budget whose replies did not collapse
    (`choose_result`), saved as policy/ with its model card and metrics.json."""
    config, hp, accelerator, out = ppo.config, ppo.config.ppo, ppo.accelerator, ppo.out
    # The last update's policy has no rollout after it: more prompts measure its KL, and its replies to them
    # against the reference's tell whether it collapsed. An earlier policy the result may fall back to is measured
    # on the same prompts: its own rollout's 16 replies are too few to trust near the budget.
    final_rows = [i for later in range(hp.steps, hp.steps + MEASURED_BATCHES) for i in ppo.rows_of(later)]
    measure = partial(measure_result, ppo.actor_critic, ppo.tokenizer, [ppo.prompts[i] for i in final_rows],
                      [ppo.prompt_texts[i] for i in final_rows], rows_of(ppo.columns, final_rows), ppo.scorer, config,
                      accelerator, {})
    measured = {hp.steps: measure()}  # {step: Measured} on the final measurement's prompts
    trained = measured[hp.steps]
    collapsed = trained.signals
    if collapsed["collapsed"] and accelerator.is_main_process:
        log.warning("the final policy's replies collapsed: %s", "; ".join(collapsed["warnings"]))
    adapter = ppo.actor_critic.policy.active_adapter
    landing = land_result(ppo, adapter, measure, trained)
    measured[hp.steps] = landing.measured
    ppo.checkpoint_kl[hp.steps], ppo.checkpoint_kl_upper[hp.steps] = trained.kl, trained.upper  # as checkpointed
    # {step: rollout KL} and {step: its bound}: the curve of every policy saved, and the result's fallbacks
    kl, upper = dict(ppo.checkpoint_kl), dict(ppo.checkpoint_kl_upper)
    saved = [s for s in range(1, hp.steps + 1) if (s % config.save_every == 0 or s == hp.steps) and s in kl]
    if (kept := checkpoint.candidate(out)) and kept[0] not in saved and kept[2] <= hp.kl_budget:
        saved.append(kept[0])  # the latest policy within the budget between two checkpoints
        kl[kept[0]], upper[kept[0]] = kept[1], kept[2]
    weights = checkpoint.trained_weights(ppo.actor_critic)  # every process (a gather under FSDP); before another loads
    load = None if distributed.is_sharded(ppo.model) else (
        lambda step: checkpoint.load_policy(checkpoint.result_folder(out, step), ppo.actor_critic.policy))
    shipped = choose_result(saved, {s: upper[s] for s in saved}, hp.kl_budget, measured, measure, load, out)
    result = measured.get(shipped)
    if shipped != hp.steps and accelerator.is_main_process:
        final = measured[hp.steps]
        why = (f"the final policy's KL {final.kl:.2f} (95% bound {final.upper:.2f}) is past "
               f"ppo.kl_budget={hp.kl_budget:g}" if final.upper > hp.kl_budget
               else "the final policy's replies collapsed")
        if len(landing.tried) > 1:
            why += (f", and no scale of its update tried ({', '.join(f'{f:.3g}' for f in sorted(landing.tried))}) "
                    "was within the budget with its replies not collapsed")
        if result is None:
            how = f"KL {kl[shipped]:.2f} by its own rollout, unmeasured under FSDP"
        else:
            replies = ("collapsed too, as every policy within the budget did" if result.signals["collapsed"]
                       else "not collapsed")
            how = f"KL {result.kl:.2f}, bound {result.upper:.2f} on the same prompts, replies {replies}"
        log.warning("%s: the result is step %d's policy (%s)", why, shipped, how)

    largest = accelerator.gather(torch.tensor([runs.peak_rss_mb()])).max().item()  # every process, before saving
    summary = {}
    if accelerator.is_main_process:
        summary = ppo.logger.summary()
        summary.update({"kl_budget": hp.kl_budget, "collapse_signals": hp.collapse_signals,
                        "result_step": shipped, "result_kl": result.kl if result else kl[shipped],
                        # the factor on the final policy's update (1: as trained) and every factor's KL tried
                        "result_scale": landing.factor if shipped == hp.steps else 1.0,
                        "scale_tried": {f"{f:g}": m.kl for f, m in sorted(landing.tried.items())},
                        "result_kl_upper": result.upper if result else upper[shipped],
                        "checkpoint_kl": {s: kl[s] for s in saved},
                        "checkpoint_kl_upper": {s: upper[s] for s in saved},
                        # the policies measured on the final measurement's prompts, the final one first
                        "measured_kl": {s: m.kl for s, m in measured.items()},
                        "measured_kl_upper": {s: m.upper for s, m in measured.items()},
                        "final_collapse": collapsed, "result_collapse": result.signals if result else None})
        summary["parameters_mb"] = ppo.parameters_mb
        summary = runs.stage_metrics(summary, ppo.started)
        summary["peak_rss_mb_largest_process"] = max(largest, summary["peak_rss_mb"])
        lineage = [config.model.name_or_path, *([f"sft ({config.sft_adapter})"] if config.sft_adapter else []),
                   f"reward ({', '.join(s.path for s in config.reward)})", "ppo"]
        with checkpoint.replaced(out / "policy") as staging:
            if shipped == hp.steps:
                adapters, head = weights
                checkpoint.write_policy(staging, ppo.actor_critic.policy,
                                        (scale.scaled_weights(adapters, adapter, landing.factor), head),
                                        config.model, config.sft_adapter or None)
            else:
                checkpoint.copy_result(out, shipped, staging)
            write_model_card(staging, title=f"PPO policy on {config.model.name_or_path}", lineage=lineage,
                             base_model=config.model.name_or_path, config=config, metrics=summary,
                             tags=["ppo", "rlhf"])
        runs.write_json(out / runs.METRICS, summary)
    ppo.logger.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        push(out / "policy", config)
    return summary


def build_actor_critic(config: PPOConfig, tokenizer, scorer, device) -> PolicyWithValueHead:
    """One copy of the base for every role: the policy (PPO adapter on), the reference (all adapters off; the SFT
    adapter is merged into the base), the scorer's reward adapters (attached here) and the critic. In eval mode:
    no dropout anywhere, so rollout and update log-probs come from one function."""
    reference_adapter = config.sft_adapter or None
    reward_adapters = adapter_scorers(scorer)
    for reward_adapter in reward_adapters:
        reward_adapter.check_base(config.model, reference_adapter)  # before the base loads
    policy = add_lora(load_reference(config.model, reference_adapter, device), config.model, config.lora)
    for reward_adapter in reward_adapters:
        reward_adapter.attach(policy)
    hp = config.ppo
    return PolicyWithValueHead(policy, critic=hp.critic if hp.uses_critic else None,
                               eos_token_id=tokenizer.eos_token_id, min_new_tokens=config.sampling.min_new_tokens,
                               critic_from=reward_adapters[0] if reward_adapters else None,
                               gather_for_generation=hp.gather_for_generation).eval()


def build_optimizer(actor_critic: PolicyWithValueHead, hp: PPOHyperparameters) -> torch.optim.Optimizer:
    """Parameter groups: the policy (with the head critic), then the adapter critic at its own learning rate."""
    groups = [{"params": group, "lr": hp.learning_rate if i == 0 else hp.critic_learning_rate or hp.learning_rate}
              for i, group in enumerate(actor_critic.parameter_groups())]
    return hf_training.optimizer(groups, hp.optim, hp.learning_rate, eps=1e-5, weight_decay=hp.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, hp: PPOHyperparameters) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 1 - step / hp.steps) if hp.lr_schedule == "linear" else (lambda step: 1.0))


def build_kl_controller(hp: PPOHyperparameters) -> KLController:
    if hp.kl_control == "fixed":
        return FixedKLController(hp.kl_coef)
    if hp.kl_control == "pi":
        return PIKLController(hp.kl_coef, hp.target_kl, hp.kl_horizon, floor=hp.kl_coef_min)
    return AdaptiveKLController(hp.kl_coef, hp.target_kl, hp.kl_horizon)


def estimate_advantages(rewards: torch.Tensor, rollout: Rollout, hp: PPOHyperparameters):
    """Step 5 for the configured estimator: (advantages (B, T), returns (B, T)); returns matter for gae only.

    grpo and rloo turn each completion's whole reward (its score, plus its summed KL penalty when the KL is in
    the reward) into one advantage against its prompt group, shared by all its tokens.
    """
    mask = rollout.response_mask
    if hp.uses_critic:
        advantages, returns = gae(rewards, rollout.values, mask, hp.gamma, hp.lam)
        return (masked_whiten(advantages, mask) if hp.whiten_advantages else advantages), returns
    if hp.advantage_estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, mask), torch.zeros_like(rewards)
    sequence_rewards = rewards.sum(-1)
    if hp.advantage_estimator == "grpo":
        per_sequence = grpo_advantages(sequence_rewards, hp.num_generations, hp.scale_by_std)
    else:
        per_sequence = rloo_advantages(sequence_rewards, hp.num_generations)
    return torch.where(mask, per_sequence[:, None], 0), torch.zeros_like(rewards)


def land_result(ppo: PPORun, adapter: str, measure, trained: "Measured") -> scale.Landing:
    """The final policy's update scaled so that its KL lands on the target (rlft/ppo/scale.py), where
    ppo.max_result_scale asks for it; else the trained policy as it is (factor 1)."""
    hp, policy = ppo.config.ppo, ppo.actor_critic.policy
    as_trained = scale.Landing(1.0, trained, {1.0: trained})
    if not hp.max_result_scale:
        return as_trained
    if not scale.scalable(policy, adapter):
        log.warning("ppo.max_result_scale: the result is not scaled onto the KL target: only a plain LoRA adapter "
                    "(no DoRA, (IA)3, trained bias or whole modules) is its reference plus a scalable update")
        return as_trained

    def measure_scaled(factor: float) -> Measured:
        try:
            with scale.scaled(policy, adapter, factor):
                return measure()
        except OffPolicyError as error:  # every process sees the same gap: all count the factor out
            log.warning("the update scaled by %.3g: %s", factor, error)
            return Measured(math.inf, math.inf, {"collapsed": True, "warnings": [str(error)]})
    landing = scale.land_on_target(measure_scaled, trained, hp.target_kl, hp.kl_budget, hp.max_result_scale)
    if landing.factor != 1.0 and ppo.accelerator.is_main_process:
        log.info("the final policy's update is scaled by %.3g: KL %.2f (95%% bound %.2f), against %.2f unscaled "
                 "and ppo.target_kl=%g", landing.factor, landing.measured.kl, landing.measured.upper, trained.kl,
                 hp.target_kl)
    return landing


def choose_result(saved: list[int], rollout_upper: dict[int, float], budget: float, measured: dict, measure, load,
                  out: Path) -> int:
    """The policy PPO ships: going back from the final one, the first whose KL bound is within the budget and whose
    replies did not collapse, each measured on the final measurement's prompts (`load(step)` puts it in place,
    `measure()` measures it; both filled into `measured`, {step: Measured}, which holds the final one's). If all
    within the budget collapsed, the latest within it. saved: the steps kept (checkpoints and the candidate);
    rollout_upper: {step: the bound from its own rollout}, what judges an earlier policy when load is None
    (under FSDP, where it is not loaded: taken unmeasured)."""
    for step in sorted(saved, reverse=True):
        if step not in measured:
            if load is None:
                if rollout_upper[step] <= budget:
                    return step
                continue
            load(step)
            measured[step] = measure()
        if scale.acceptable(measured[step], budget):
            return step
    within = sorted((step for step, m in measured.items() if m.upper <= budget), reverse=True)
    if within:
        return within[0]
    bounds = {step: m.upper for step, m in measured.items()} if load else rollout_upper
    raise RlftError(
        f"no checkpoint's KL is within ppo.kl_budget={budget:g} (95% upper bounds by step: "
        f"{', '.join(f'{s}: {kl:.1f}' for s, kl in sorted(bounds.items()))}): raise ppo.kl_coef or lower "
        f"ppo.learning_rate, or raise the budget (checkpoints kept in {out / 'checkpoints'})")


class Measured(NamedTuple):
    """A policy measured on the final measurement's prompts (measure_result)."""

    kl: float  # mean exact KL per response, all processes
    upper: float  # its 95% upper bound (kl_upper_bound)
    signals: dict  # rlft.hacking.collapse against the reference's replies, with "collapsed" agreed by all processes


def measure_result(actor_critic, tokenizer, prompts: list, prompt_texts: list[str], columns: dict[str, list], scorer,
                   config: PPOConfig, accelerator, reference_cache: dict) -> Measured:
    """The live policy's exact KL per response on fresh samples and its 95% upper bound (all processes'), and
    its collapse signals against the reference's samples on the same prompts (rlft.hacking.collapse, this
    process's rows). The reference's samples are drawn once and kept in reference_cache for every later call."""
    hp = config.ppo
    measured = generate(actor_critic, tokenizer, prompts, prompt_texts, config.sampling, columns)
    score(measured, scorer, hp.missing_eos_penalty, hp.score_clip)
    forward_passes(actor_critic, measured, hp.forward_batch_size)
    check_sampler(measured, accelerator, hp.max_sampler_gap, config.model.name_or_path, hp.steps + 1)
    if "reference" not in reference_cache:
        with active_adapter(actor_critic.policy, None):  # the reference: every adapter off
            reference_cache["reference"], = sample(actor_critic, tokenizer, prompt_texts, config.sampling)
    reference = reference_cache["reference"]
    lengths = {"policy": measured.response_mask.sum(-1).tolist(), "reference": reference.mask.sum(-1).tolist()}
    signals = collapse({"policy": measured.completions, "reference": reference.texts}, lengths,
                       signals_counted=hp.collapse_signals)
    # one verdict for all processes (collapsed on any), so that they all choose the same result
    signals["collapsed"] = accelerator.reduce(torch.tensor(float(bool(signals["warnings"])),
                                                           device=measured.scores.device), "max").item() > 0
    return Measured(*kl_measured(measured, accelerator), signals)


def kl_measured(rollout: Rollout, accelerator) -> tuple[float, float]:
    """(mean, 95% upper bound) of the exact KL per response over every process's responses."""
    per_response = accelerator.gather(rollout.exact_kl.sum(-1))
    return per_response.mean().item(), kl_upper_bound(per_response)


def check_sampler(rollout: Rollout, accelerator, max_gap: float, model_name: str, step: int) -> dict[str, float]:
    """The gap between the sampler's log-probs and step 3's (rlft.ppo.core.logprob_gap), over all processes;
    stops the run when the rollout was evidently not sampled from the policy PPO recomputes."""
    gap = {key: accelerator.reduce(value.detach().float(), "max" if key == "max" else "mean").item()
           for key, value in logprob_gap(rollout.sampler_logprobs, rollout.logprobs, rollout.response_mask).items()}
    if not gap["mean"] <= max_gap:
        raise off_policy(f"at step {step}", gap["mean"], "ppo.max_sampler_gap", max_gap, model_name)
    return gap


def check_finite_weights(optimizer: torch.optim.Optimizer, accelerator, step: int, out: Path, model,
                         query_mask: torch.Tensor) -> None:
    # the optimizer's parameters: under FSDP2 the DTensors prepare swapped in
    if not distributed.all_finite([p for group in optimizer.param_groups for p in group["params"]], accelerator):
        advice = nan_advice(model, query_mask, "the run diverged; lower ppo.learning_rate or ppo.max_grad_norm")
        raise RlftError(f"the policy's weights became NaN/inf in the update of step {step}: {advice} (checkpoints "
                        f"before it are kept in {out / 'checkpoints'})")


def nan_advice(model, query_mask: torch.Tensor, otherwise: str) -> str:
    """What to change after NaN/inf in an update: the attention kernel where prompts were left-padded under SDPA,
    whose backward gives NaN on such rows for some families (Gemma-3n, rlft.models.EAGER_BY_DEFAULT), else
    `otherwise`. query_mask: (B, P), the rollout's left-padded prompts."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and not bool(query_mask.all()):
        return ("the prompts were left-padded and attention is SDPA, whose backward gives NaN on left-padded rows "
                f"for some families: set model.attn_implementation=eager (else {otherwise})")
    return otherwise


def epoch_order(batch: int, num_generations: int) -> torch.Tensor:
    """A shuffled order of the rollout's rows that keeps each prompt's group together and in order: (batch,)."""
    groups = torch.randperm(batch // num_generations)
    return (groups[:, None] * num_generations + torch.arange(num_generations)).flatten()


def ppo_update(model, accelerator, optimizer, rollout: Rollout, hp: PPOHyperparameters, kl_coef: float,
               first: FirstMiniBatch | None = None) -> dict:
    """Step 6: `ppo_epochs` passes of shuffled mini-batches of whole groups; accumulation over micro-batches.

    Each micro-batch's loss is weighted by its share of the mini-batch of all processes (of tokens for
    token_mean, of sequences for sequence_mean), so the gradient equals that of one pass over the whole
    global mini-batch (accumulation 4x1 == 1x4, 2 processes == 1). With kl_in=loss the loss adds
    kl_coef * k3(pi || pi_ref) per token. With max_update_kl the update stops at the first mini-batch whose
    forward finds the policy that far from the rollout's (before stepping on it; without accumulation, before
    its backward). first: the first epoch's row order and the live forward of its first micro-batch
    (step 3's), used instead of running it again; else the order is drawn here. rollout: with step 5's
    advantages and returns.
    """
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    mask = loss_mask(rollout.response_mask, rollout.ended_with_eos, hp.mask_truncated_completions)
    advantages, returns, temperature = rollout.advantages, rollout.returns, rollout.temperature
    length = rollout.response_ids.shape[1]
    micro_size = hp.micro_batch_size
    stats = defaultdict(list)
    optimizer_steps = 0
    for epoch in range(hp.ppo_epochs):
        order = first.order if epoch == 0 and first is not None else epoch_order(len(mask), hp.num_generations)
        for start in range(0, len(order), hp.mini_batch_size):
            mini_batch = order[start : start + hp.mini_batch_size]
            # The mini-batch of all processes: DDP averages gradients over processes, so each one scales its
            # loss by world size / global count and the result is the loss of the global mini-batch.
            mini_share = accelerator.reduce(share_of(mask[mini_batch], hp.loss_aggregation).float(), "sum")
            mini_share = mini_share.clamp(min=1) / accelerator.num_processes
            mini_approxkl = []
            for micro_start in range(0, len(mini_batch), micro_size):
                rows = mini_batch[micro_start : micro_start + micro_size]
                is_last = micro_start + micro_size >= len(mini_batch)
                with accelerator.no_sync(model) if not is_last else nullcontext():
                    if first is not None and first.output is not None and epoch == 0 and start == micro_start == 0:
                        assert len(rows) == len(first.output[0]), "the folded forward must be one whole micro-batch"
                        logprobs, values, logits = first.output
                    else:
                        logprobs, values, logits = model(input_ids[rows], attention_mask[rows], length, temperature)
                    pg_loss, pg_stats = policy_loss(logprobs, rollout.logprobs[rows], advantages[rows], mask[rows],
                                                    hp.clip_range, hp.loss_aggregation, hp.clip_range_high)
                    loss = pg_loss
                    if hp.uses_critic:
                        vf_loss, vf_stats = value_loss(values, rollout.values[rows], returns[rows], mask[rows],
                                                       hp.clip_range_value)
                        loss = loss + hp.value_loss_coef * vf_loss
                        stats["loss/value"].append(vf_loss.item())
                        stats["val/clipfrac"].append(vf_stats["clipfrac"].item())
                    if hp.kl_in == "loss":
                        kl_loss = aggregate(kl_penalty(logprobs, rollout.ref_logprobs[rows], "k3"), mask[rows],
                                            hp.loss_aggregation)
                        loss = loss + kl_coef * kl_loss
                        stats["loss/kl"].append(kl_loss.item())
                    with torch.set_grad_enabled(hp.entropy_coef > 0):  # else logged only: keep it off the graph
                        # aggregated like the policy loss, so that the global mini-batch's bonus is the same
                        # however its rows are split over processes and micro-batches
                        entropy = entropy_from_logits(logits, temperature)
                        mean_entropy = aggregate(entropy, mask[rows], hp.loss_aggregation)
                        cap = rollout.ref_entropy[rows] if hp.entropy_cap == "reference" else None
                        bonus = aggregate(entropy_bonus(entropy, cap), mask[rows], hp.loss_aggregation)
                    loss = loss - hp.entropy_coef * bonus
                    if not torch.isfinite(loss):
                        raise RlftError("PPO loss became NaN/inf: " + nan_advice(
                            accelerator.unwrap_model(model), rollout.query_mask,
                            "lower ppo.learning_rate or check the scorer's scores"))
                    stats["loss/policy"].append(pg_loss.item())
                    stats["policy/entropy"].append(mean_entropy.item())
                    for key in ("clipfrac", "clipfrac_low", "clipfrac_high"):
                        stats[f"policy/{key}"].append(pg_stats[key].item())
                    stats["policy/approxkl"].append(pg_stats["approxkl"].item())
                    mini_approxkl.append(pg_stats["approxkl"])
                    # Trust region: this mini-batch's forward saw the policy after the update's steps so far.
                    # Past the threshold, no more steps (decided on every process's rows alike, so they stay in
                    # step). Known before the last backward, which a one-micro-batch mini-batch then skips (after
                    # earlier micro-batches it runs: FSDP2 holds their no_sync gradients until a synced backward).
                    if is_last and hp.max_update_kl:
                        moved = accelerator.reduce(torch.stack(mini_approxkl).mean(), "mean").item()
                        if moved > hp.max_update_kl:
                            stats["policy/update_stopped"] = [1.0]
                            if micro_start == 0:
                                break
                    accelerator.backward(loss * share_of(mask[rows], hp.loss_aggregation) / mini_share)
            if stats.get("policy/update_stopped"):
                optimizer.zero_grad(set_to_none=True)
                break
            # Each group clipped on its own: the critic's gradient must not shrink the policy's step.
            for group, key in zip(optimizer.param_groups, ("policy/grad_norm", "val/grad_norm")):
                norm = accelerator.clip_grad_norm_(group["params"], hp.max_grad_norm)
                stats[key].append(float(distributed.full_tensor(norm)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            optimizer_steps += 1
        stats["policy/epochs"] = [epoch + 1]
        if stats.get("policy/update_stopped"):
            break
    stats["policy/optimizer_steps"] = [optimizer_steps]
    stats.setdefault("policy/update_stopped", [0.0])
    return {key: sum(values) / len(values) for key, values in stats.items()}


def share_of(response_mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """What a micro-batch's loss is an average over: its tokens (token_mean) or its non-empty sequences."""
    if aggregation == "token_mean":
        return response_mask.sum()
    return response_mask.any(-1).sum()


def step_metrics(accelerator, rollout: Rollout, sampled_kl: torch.Tensor, penalty: torch.Tensor | None, beta: float,
                 mean_kl: float, update_stats: dict, critic: bool, group_size: int = 1) -> dict:
    """Namespaced per-step metrics, averaged over processes (the same names in JSONL, TensorBoard, reports).

    sampled_kl: (B,) step 4's per-response sum of the penalty's estimator; penalty: (B,) what of it the reward
    carried (None when the KL is in the loss); beta: the KL coefficient; mean_kl: the exact KL per response,
    averaged over processes (what the controller saw).
    """
    mask = rollout.response_mask
    scores = accelerator.gather(rollout.scores)
    local = {
        "objective/kl_sampled": sampled_kl.mean(),
        "ref/entropy": masked_mean(rollout.ref_entropy, mask),  # beside policy/entropy: collapse lowers the policy's
        "response/length": mask.sum(1).float().mean(),
        "response/eos_rate": rollout.ended_with_eos.float().mean(),
    }
    if penalty is not None:
        local["objective/non_score_reward"] = -penalty.mean()
        local["objective/rlhf_reward"] = (rollout.scores - penalty).mean()
    if critic:
        returns = rollout.returns
        local["val/explained_variance"] = 1 - masked_var(returns - rollout.values, mask) / masked_var(
            returns, mask).clamp(min=1e-8)
        local["val/mean"] = masked_mean(rollout.values, mask)
    metrics = {key: accelerator.reduce(value.detach().float(), "mean").item() for key, value in local.items()}
    metrics["response/clipped_ratio"] = 1 - metrics["response/eos_rate"]  # cut at max_new_tokens (TRL's name)
    metrics.update({
        "objective/scores": scores.mean().item(),
        "objective/scores_std": scores.std().item() if len(scores) > 1 else 0.0,
        # groups whose scores tie: nothing for a group-relative estimator to learn from
        **({"objective/frac_reward_zero_std": frac_zero_std(scores, group_size)} if group_size > 1 else {}),
        "objective/kl": mean_kl,
        "objective/kl_coef": beta,
    })
    metrics.update(update_stats)
    return metrics


def prompt_batch(step: int, rank: int, world: int, batch_size: int, num_prompts: int, seed: int) -> list[int]:
    """Prompt indices for one process at one step: a fresh seeded permutation per pass over the data.

    A pure function of (step, rank), so a resumed run sees exactly the prompts it would have seen.
    """
    indices = []
    for position in range((step * world + rank) * batch_size, (step * world + rank + 1) * batch_size):
        epoch, offset = divmod(position, num_prompts)
        order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.append(int(order[offset]))
    return indices
