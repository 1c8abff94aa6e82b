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
from functools import partial
from pathlib import Path

import torch
from torch.distributed.fsdp import register_fsdp_forward_method

from rlft import distributed, hf_training, runs
from rlft.data import load_splits, prompts_of, render_prompts
from rlft.errors import RlftError
from rlft.generation import decode_responses, response_mask_from_eos, sample
from rlft.hacking import collapse
from rlft.metrics import MetricsLogger
from rlft.models import add_lora, configured_context_length, load_tokenizer
from rlft.policy import active_adapter, load_reference
from rlft.publish import push, write_model_card
from rlft.ppo import checkpoint
from rlft.ppo.config import RESUMABLE_CHANGES, PPOConfig, PPOHyperparameters
from rlft.ppo.core import (AdaptiveKLController, FixedKLController, PIKLController, aggregate, entropy_from_logits,
                           gae, grpo_advantages, kl_penalty, logprob_gap, masked_mean, masked_var, masked_whiten,
                           per_token_rewards, policy_loss, reinforce_pp_advantages, rloo_advantages,
                           truncated_importance_weights, value_loss)
from rlft.ppo.model import PolicyWithValueHead
from rlft.ppo.rollout import Rollout, forward_passes, generate_and_score
from reward_models.scorers import adapter_scorers, build_scorer

log = logging.getLogger(__name__)
__all__ = ["PPOConfig", "run"]
MEASURED_BATCHES = 2  # rollout batches of fresh prompts that measure the final policy (32 replies by default)


def run(config: PPOConfig) -> dict:
    if not config.reward:
        raise RlftError("ppo needs a reward: set reward=[{kind: model, path: runs/reward}] or a module:function scorer")
    accelerator = distributed.accelerator()
    hp = config.ppo
    out = Path(config.output_dir)
    last = checkpoint.latest(out) if config.resume else None
    runs.prepare(out, config, "ppo", resuming=last is not None, may_change=RESUMABLE_CHANGES)
    runs.seed_everything(config.seed)  # same on every process: identical adapter and head init

    # Setup: prompts, scorer and optimizer name first, so bad input fails before the policy loads.
    hf_training.check_optimizer(hp.optim, "ppo.optim")
    tokenizer = load_tokenizer(config.model)
    train_data, _, _ = load_splits(config.data, ("prompt_only", "conversational"), config.seed, "prompt data")
    prompts = prompts_of(train_data)
    data = runs.check_data(out, config.data.path, train_data, resuming=last is not None)
    prompt_texts = render_prompts(tokenizer, prompts)
    check_prompt_lengths(tokenizer, prompt_texts, config.sampling, config.model)
    scorer = build_scorer(config.reward, accelerator.device, shared_base=True)
    reference_adapter = config.sft_adapter or None
    actor_critic = build_actor_critic(config, tokenizer, scorer, accelerator.device)
    # Parameter groups: the policy (with the head critic), then the adapter critic at its own learning rate.
    groups = [{"params": group, "lr": hp.learning_rate if i == 0 else hp.critic_learning_rate or hp.learning_rate}
              for i, group in enumerate(actor_critic.parameter_groups())]
    optimizer = hf_training.optimizer(groups, hp.optim, hp.learning_rate, eps=1e-5, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 1 - step / hp.steps) if hp.lr_schedule == "linear" else (lambda step: 1.0)
    )
    if hp.kl_control == "fixed":
        kl_controller = FixedKLController(hp.kl_coef)
    else:
        controller = PIKLController if hp.kl_control == "pi" else AdaptiveKLController
        kl_controller = controller(hp.kl_coef, hp.target_kl, hp.kl_horizon)

    start_step = 0
    if last is not None:
        state = checkpoint.load(last, accelerator.process_index, actor_critic.policy, actor_critic.value_head)
        scheduler.load_state_dict(state["scheduler"])
        kl_controller.load_state_dict(state["kl_controller"])
        start_step = state["step"]
        log.info("resumed from %s (step %d)", last, start_step)
    else:
        torch.manual_seed(config.seed + 1000 * accelerator.process_index)  # distinct samples per process
    model, optimizer = accelerator.prepare(actor_critic, optimizer)
    if last is not None:  # after prepare: under FSDP the optimizer's state is sharded like its parameters
        checkpoint.load_optimizer(model, optimizer, state["optimizer"])
    for method in ("sample_responses", "reference_logprobs"):  # FSDP2 gathers around these as around forward
        register_fsdp_forward_method(model, method)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]  # FSDP2 swapped in DTensors
    # this process's share of the weights (1/N of the base under FSDP), the largest of all processes
    parameters_mb = accelerator.gather(torch.tensor([distributed.parameter_bytes(model) / 2**20])).max().item()
    logger = MetricsLogger(out, start_step, accelerator.is_main_process)

    from tqdm.auto import tqdm

    def rows_of(step: int) -> list[int]:
        """This process's prompts at `step`, each num_generations times in a row: a group, whole on one process."""
        return [i for i in prompt_batch(step, accelerator.process_index, accelerator.num_processes,
                                        hp.rollout_batch_size // hp.num_generations, len(prompts), config.seed)
                for _ in range(hp.num_generations)]

    # exact KL of the policy after s updates (checkpoint step-s), read by the rollout of the next step
    checkpoint_kl = dict(state.get("checkpoint_kl", {})) if last is not None else {}
    runs.begin(out, config, data)  # from here on this run writes in its folder
    progress = tqdm(range(start_step, hp.steps), desc="ppo", disable=not accelerator.is_main_process,
                    initial=start_step, total=hp.steps)
    for step in progress:
        started, cpu_started = time.perf_counter(), time.process_time()
        rows = rows_of(step)

        # 1.-2. generate and score
        rollout = generate_and_score(actor_critic, tokenizer, [prompts[i] for i in rows],
                                     [prompt_texts[i] for i in rows], scorer, config.sampling,
                                     hp.missing_eos_penalty, hp.score_clip)
        # The update's first mini-batch, drawn now (nothing between here and the update draws random numbers,
        # so the stream is what it would be there): its forward is step 3's for those rows, done once.
        first_order = epoch_order(len(rows), hp.num_generations)
        fold = first_order[:hp.mini_batch_size] if hp.gradient_accumulation_steps == 1 else None

        # 3. policy log-probs and values (the first mini-batch's with autograd on), reference log-probs, exact KL
        first_output = forward_passes(actor_critic, rollout, hp.forward_batch_size, config.sampling.temperature,
                                      graph_model=model, graph_rows=fold)
        mask = rollout.response_mask
        gap = check_sampler(rollout, accelerator, hp.max_sampler_gap, config.model.name_or_path, step + 1)
        sampler_stats = {f"sampler/logprob_gap_{key}": value for key, value in gap.items()}
        # the exact KL of the policy the rollout sampled from: what the controller steers and the budget reads
        mean_kl = accelerator.reduce(rollout.exact_kl.sum(-1).mean(), "mean").item()
        checkpoint_kl[step] = mean_kl  # the policy saved at the end of the previous step

        # 4. per-token rewards: -beta * KL on every token (unless the KL goes in the loss), the score on the last
        beta = kl_controller.value
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, hp.kl_estimator)
        rewards, sampled_kl = per_token_rewards(rollout.scores, kl, beta if hp.kl_in == "reward" else 0.0, mask)
        if hp.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)

        # 5. advantages and returns (returns train the critic: gae only)
        advantages, returns = estimate_advantages(rewards, rollout, hp)
        if hp.sampler_correction_cap:  # the tokens came from the sampler's distribution: reweight to PPO's
            weights = truncated_importance_weights(rollout.logprobs, rollout.sampler_logprobs, mask,
                                                   hp.sampler_correction_cap)
            advantages = advantages * weights
            sampler_stats["sampler/correction_capped"] = accelerator.reduce(
                masked_mean((weights >= hp.sampler_correction_cap).float(), mask), "mean").item()

        # 6. update: several epochs of clipped policy and value losses over mini-batches
        update_started = time.perf_counter()
        update_stats = ppo_update(model, accelerator, optimizer, rollout, advantages, returns, hp,
                                  config.sampling.temperature, beta, first_order, first_output)
        del first_output  # its graph was freed by backward; the tensors go too
        scheduler.step()
        rollout.timings["time/update"] = time.perf_counter() - update_started
        check_finite_weights(trainable, accelerator, step + 1, out)  # before NaN weights reach a checkpoint or generate()

        # 7. KL controller, on step 3's exact KL of all processes' samples so beta stays identical everywhere
        kl_controller.update(mean_kl, hp.rollout_batch_size * accelerator.num_processes)

        metrics = step_metrics(accelerator, rollout, sampled_kl, beta, hp.kl_in == "reward", mean_kl, returns,
                               update_stats, critic=hp.uses_critic)
        metrics.update(sampler_stats)
        metrics.update(rollout.timings)
        metrics["time/step"] = time.perf_counter() - started
        # CPU seconds of this process (all threads): far steadier than wall time on a shared machine
        metrics["time/cpu_step"] = time.process_time() - cpu_started
        metrics["perf/samples_per_s"] = len(rows) * accelerator.num_processes / metrics["time/step"]
        metrics["perf/tokens_per_s"] = metrics["response/length"] * metrics["perf/samples_per_s"]
        metrics["lr"] = scheduler.get_last_lr()[0]
        logger.log(step + 1, metrics)
        progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{mean_kl:.2f}", beta=f"{beta:.3f}")
        if (step + 1) % config.sample_every == 0 or step == start_step:
            logger.samples(step + 1, rollout)

        if not math.isfinite(mean_kl) or mean_kl > hp.max_kl:
            raise RlftError(
                f"mean KL per sequence reached {mean_kl:.1f} > ppo.max_kl={hp.max_kl} at step {step + 1}: the "
                "policy ran away from its reference; lower ppo.learning_rate or raise ppo.kl_coef "
                f"(last checkpoint kept in {out / 'checkpoints'})"
            )
        if (step + 1) % config.save_every == 0 or step + 1 == hp.steps:
            trainer_state = {"optimizer": checkpoint.optimizer_state(model, optimizer),
                             "scheduler": scheduler.state_dict(),
                             "kl_controller": kl_controller.state_dict(), "checkpoint_kl": checkpoint_kl,
                             "step": step + 1}
            checkpoint.save(accelerator, out, step + 1, actor_critic, trainer_state, config.model, reference_adapter)

    # The last update's policy has no rollout after it: more prompts measure its KL, and its replies to them
    # against the reference's tell whether it collapsed.
    final_rows = [i for later in range(hp.steps, hp.steps + MEASURED_BATCHES) for i in rows_of(later)]
    measure = partial(measure_result, actor_critic, tokenizer, [prompts[i] for i in final_rows],
                      [prompt_texts[i] for i in final_rows], scorer, config, accelerator)
    checkpoint_kl[hp.steps], collapsed = measure()
    if collapsed["collapsed"] and accelerator.is_main_process:
        log.warning("the final policy's replies collapsed: %s", "; ".join(collapsed["warnings"]))
    saved = {s: checkpoint_kl[s] for s in range(1, hp.steps + 1)
             if (s % config.save_every == 0 or s == hp.steps) and s in checkpoint_kl}
    weights = checkpoint.trained_weights(actor_critic)  # every process (a gather under FSDP); before another loads
    load = None if distributed.is_sharded(model) else (
        lambda step: checkpoint.load_policy(checkpoint.folder_of(out, step), actor_critic.policy))
    collapse_by_step = {hp.steps: collapsed}
    shipped = choose_result(saved, hp.kl_budget, collapse_by_step, measure, load, out)
    if shipped != hp.steps and accelerator.is_main_process:
        why = (f"the final policy's KL {saved[hp.steps]:.2f} is past ppo.kl_budget={hp.kl_budget:g}"
               if saved[hp.steps] > hp.kl_budget else "the final policy's replies collapsed")
        log.warning("%s: the result is step %d's policy (KL %.2f%s)", why, shipped, saved[shipped],
                    ", replies not collapsed" if shipped in collapse_by_step and not collapse_by_step[shipped]["collapsed"]
                    else "")

    summary = {}
    if accelerator.is_main_process:
        summary = logger.summary()
        summary.update({"kl_budget": hp.kl_budget, "result_step": shipped, "result_kl": saved[shipped],
                        "checkpoint_kl": saved, "final_collapse": collapsed,
                        "result_collapse": collapse_by_step.get(shipped)})
        summary["peak_rss_mb"] = runs.peak_rss_mb()
        summary["parameters_mb"] = parameters_mb
        lineage = [config.model.name_or_path, *([f"sft ({config.sft_adapter})"] if config.sft_adapter else []),
                   f"reward ({', '.join(s.path for s in config.reward)})", "ppo"]
        with checkpoint.replaced(out / "policy") as staging:
            if shipped == hp.steps:
                checkpoint.write_policy(staging, actor_critic.policy, weights, config.model, reference_adapter)
            else:
                checkpoint.copy_result(out, shipped, staging)
            write_model_card(staging, title=f"PPO policy on {config.model.name_or_path}", lineage=lineage,
                             base_model=config.model.name_or_path, config=config, metrics=summary,
                             tags=["ppo", "rlhf"])
        runs.write_json(out / runs.METRICS, summary)
    logger.close()
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


def choose_result(kl_by_step: dict[int, float], budget: float, collapse_by_step: dict[int, dict], measure, load,
                  out: Path) -> int:
    """The checkpoint PPO ships: the last within the KL budget whose replies did not collapse. Going back from
    the last one within the budget, each is loaded and measured (`measure`, on the final measurement's prompts)
    only when the one after it collapsed; if all did, the last within the budget. kl_by_step: {step: KL};
    collapse_by_step: {step: rlft.hacking.collapse signals} measured so far, filled in here; load(step) puts
    that checkpoint's policy in place (None under FSDP: an earlier checkpoint is then taken unmeasured)."""
    within = sorted((step for step, kl in kl_by_step.items() if kl <= budget), reverse=True)
    if not within:
        raise RlftError(
            f"no checkpoint's KL is within ppo.kl_budget={budget:g} (by step: "
            f"{', '.join(f'{s}: {kl:.1f}' for s, kl in kl_by_step.items())}): raise ppo.kl_coef or lower "
            f"ppo.learning_rate, or raise the budget (checkpoints kept in {out / 'checkpoints'})")
    for step in within:
        if step not in collapse_by_step:
            if load is None:
                return step
            load(step)
            collapse_by_step[step] = measure()[1]
        if not collapse_by_step[step]["collapsed"]:
            return step
    return within[0]


def measure_result(actor_critic, tokenizer, prompts: list, prompt_texts: list[str], scorer, config: PPOConfig,
                   accelerator) -> tuple[float, dict]:
    """The final policy's exact KL per response on fresh samples (mean over processes), and its collapse signals
    against the reference's samples on the same prompts (rlft.hacking.collapse, this process's rows)."""
    hp = config.ppo
    measured = generate_and_score(actor_critic, tokenizer, prompts, prompt_texts, scorer, config.sampling,
                                  hp.missing_eos_penalty, hp.score_clip)
    forward_passes(actor_critic, measured, hp.forward_batch_size, config.sampling.temperature)
    check_sampler(measured, accelerator, hp.max_sampler_gap, config.model.name_or_path, hp.steps + 1)
    with active_adapter(actor_critic.policy, None):  # the reference: every adapter off
        reference = sample(actor_critic, {"input_ids": measured.query_ids, "attention_mask": measured.query_mask},
                           config.sampling, tokenizer)
    reference_mask, _ = response_mask_from_eos(reference.ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    signals = collapse({"policy": measured.completions, "reference": decode_responses(tokenizer, reference.ids)},
                       {"policy": measured.response_mask.sum(-1).tolist(), "reference": reference_mask.sum(-1).tolist()})
    # one verdict for all processes (collapsed on any), so that they all choose the same result
    signals["collapsed"] = accelerator.reduce(torch.tensor(float(bool(signals["warnings"])),
                                                           device=measured.scores.device), "max").item() > 0
    return accelerator.reduce(measured.exact_kl.sum(-1).mean(), "mean").item(), signals


def check_sampler(rollout: Rollout, accelerator, max_gap: float, model_name: str, step: int) -> dict[str, float]:
    """The gap between the sampler's log-probs and step 3's (rlft.ppo.core.logprob_gap), over all processes;
    stops the run when the rollout was evidently not sampled from the policy PPO recomputes."""
    gap = {key: accelerator.reduce(value.detach().float(), "max" if key == "max" else "mean").item()
           for key, value in logprob_gap(rollout.sampler_logprobs, rollout.logprobs, rollout.response_mask).items()}
    if not gap["mean"] <= max_gap:
        raise RlftError(
            f"at step {step} the sampler's log-probs of its own tokens differ from the recomputed ones by "
            f"{gap['mean']:.2f} nats per token on average (ppo.max_sampler_gap={max_gap:g}): '{model_name}' does not "
            "decode in rlft's sampling loop as it scores whole sequences (a model that ignores the KV cache "
            "argument?); report it with the model's name, or raise ppo.max_sampler_gap if the gap is expected")
    return gap


def check_finite_weights(parameters: list[torch.Tensor], accelerator, step: int, out: Path) -> None:
    if not distributed.all_finite(parameters, accelerator):
        raise RlftError(
            f"the policy's weights became NaN/inf in the update of step {step}: the run diverged; lower "
            f"ppo.learning_rate or ppo.max_grad_norm (checkpoints before it are kept in {out / 'checkpoints'})"
        )


def epoch_order(batch: int, num_generations: int) -> torch.Tensor:
    """A shuffled order of the rollout's rows that keeps each prompt's group together and in order: (batch,)."""
    groups = torch.randperm(batch // num_generations)
    return (groups[:, None] * num_generations + torch.arange(num_generations)).flatten()


def ppo_update(model, accelerator, optimizer, rollout: Rollout, advantages, returns,
               hp: PPOHyperparameters, temperature: float, kl_coef: float, first_order: torch.Tensor | None = None,
               first_output: tuple | None = None) -> dict:
    """Step 6: `ppo_epochs` passes of shuffled mini-batches of whole groups; accumulation over micro-batches.

    Each micro-batch's loss is weighted by its share of the mini-batch of all processes (of tokens for
    token_mean, of sequences for sequence_mean), so the gradient equals that of one pass over the whole
    global mini-batch (accumulation 4x1 == 1x4, 2 processes == 1). With kl_in=loss the loss adds
    kl_coef * k3(pi || pi_ref) per token. With max_update_kl the update stops at the first mini-batch whose
    forward finds the policy that far from the rollout's (before stepping on it). first_order: the first
    epoch's row order (else drawn here); first_output: the live forward output of its first micro-batch
    (rlft.ppo.rollout.forward_passes), used instead of running that forward again.
    """
    input_ids, attention_mask, mask = rollout.input_ids, rollout.attention_mask, rollout.response_mask
    length = rollout.response_ids.shape[1]
    micro_size = hp.mini_batch_size // hp.gradient_accumulation_steps
    stats = defaultdict(list)
    optimizer_steps = 0
    for epoch in range(hp.ppo_epochs):
        order = first_order if epoch == 0 and first_order is not None else epoch_order(len(mask), hp.num_generations)
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
                    if first_output is not None and epoch == 0 and start == 0 and micro_start == 0:
                        assert len(rows) == len(first_output[0]), "the folded forward must be one whole micro-batch"
                        logprobs, values, logits = first_output
                    else:
                        logprobs, values, logits = model(input_ids[rows], attention_mask[rows], length, temperature)
                    pg_loss, pg_stats = policy_loss(logprobs, rollout.logprobs[rows], advantages[rows], mask[rows],
                                                    hp.clip_range, hp.loss_aggregation)
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
                        mean_entropy = aggregate(entropy_from_logits(logits, temperature), mask[rows],
                                                 hp.loss_aggregation)
                    loss = loss - hp.entropy_coef * mean_entropy
                    if not torch.isfinite(loss):
                        raise RlftError("PPO loss became NaN/inf: lower ppo.learning_rate or check the scorer's scores "
                                        "(if the first steps already fail, try model.attn_implementation=eager: some "
                                        "families' SDPA backward gives NaN on left-padded rows)")
                    accelerator.backward(loss * share_of(mask[rows], hp.loss_aggregation) / mini_share)
                stats["loss/policy"].append(pg_loss.item())
                stats["policy/entropy"].append(mean_entropy.item())
                stats["policy/clipfrac"].append(pg_stats["clipfrac"].item())
                stats["policy/approxkl"].append(pg_stats["approxkl"].item())
                mini_approxkl.append(pg_stats["approxkl"])
            # Trust region: this mini-batch's forward saw the policy after the update's steps so far. Past the
            # threshold, no more steps (decided on every process's rows alike, so they stay in step).
            moved = accelerator.reduce(torch.stack(mini_approxkl).mean(), "mean").item()
            if hp.max_update_kl and moved > hp.max_update_kl:
                optimizer.zero_grad(set_to_none=True)
                stats["policy/update_stopped"] = [1.0]
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


def step_metrics(accelerator, rollout: Rollout, sampled_kl, beta: float, kl_in_reward: bool, mean_kl: float,
                 returns, update_stats: dict, critic: bool) -> dict:
    """Namespaced per-step metrics, averaged over processes (the same names in JSONL, TensorBoard, reports).

    sampled_kl: (B,) step 4's per-response sum of the penalty's estimator; beta: its weight (in the reward when
    kl_in_reward, else in the loss); mean_kl: the exact KL per response, averaged over processes (what the
    controller saw).
    """
    mask = rollout.response_mask
    scores = accelerator.gather(rollout.scores)
    local = {
        "objective/kl_sampled": sampled_kl.mean(),
        "response/length": mask.sum(1).float().mean(),
        "response/eos_rate": rollout.ended_with_eos.float().mean(),
    }
    if kl_in_reward:  # the penalty the reward carried
        local["objective/non_score_reward"] = -beta * sampled_kl.mean()
        local["objective/rlhf_reward"] = (rollout.scores - beta * sampled_kl).mean()
    if critic:
        local["val/explained_variance"] = 1 - masked_var(returns - rollout.values, mask) / masked_var(
            returns, mask).clamp(min=1e-8)
        local["val/mean"] = masked_mean(rollout.values, mask)
    metrics = {key: accelerator.reduce(value.detach().float(), "mean").item() for key, value in local.items()}
    metrics.update({
        "objective/scores": scores.mean().item(),
        "objective/scores_std": scores.std().item() if len(scores) > 1 else 0.0,
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


def check_prompt_lengths(tokenizer, prompt_texts: list[str], sampling, model_config) -> None:
    """Every prompt within sampling.max_prompt_length, and with max_new_tokens within the model's context (read
    from its config alone): said before the weights load, not at the step that draws the prompt."""
    lengths = [len(ids) for ids in tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]]
    too_long = sum(length > sampling.max_prompt_length for length in lengths)
    if too_long:
        raise RlftError(
            f"{too_long} of {len(lengths)} prompts are longer than sampling.max_prompt_length="
            f"{sampling.max_prompt_length} tokens (longest {max(lengths)}): raise the limit or filter the prompts"
        )
    context = configured_context_length(model_config)
    if context and max(lengths) + sampling.max_new_tokens > context:
        past = sum(length + sampling.max_new_tokens > context for length in lengths)
        raise RlftError(
            f"{past} of {len(lengths)} prompts (longest {max(lengths)} tokens) plus sampling.max_new_tokens="
            f"{sampling.max_new_tokens} are longer than the model's context ({context} tokens): filter the prompts, "
            "or lower sampling.max_new_tokens")
