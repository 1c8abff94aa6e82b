"""PPO/RLHF math as small pure torch functions; the PPO loop calls these, tests check them by hand.

Shapes: B = batch, T = response_len, V = vocab. `response_mask: (B, T)` (bool or 0/1 float) marks
real response tokens; padded positions never enter a statistic and come back as 0.
"""

import math

import torch

KL_ESTIMATORS = ("k1", "k3", "abs", "mse")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is set; over everything, or along `dim`.

    `torch.where` rather than `x * mask`, so a NaN/inf in a padded slot cannot leak in.
    An empty mask gives 0 rather than NaN.
    """
    mask = mask.bool()
    total = torch.where(mask, x, 0).sum(dim)
    return total / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all masked positions (a scalar).

    With `unbiased`, Bessel's correction n / (n - 1); a single valid value gives variance 0.
    """
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered**2, mask)
    if unbiased:
        n = mask.bool().sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise `x` to zero mean and unit variance over valid positions; padded positions are 0.

    x, mask: (B, T). `shift_mean=False` restores the mean afterwards (used for rewards, so
    their sign is kept). Reference: `whiten` in openai/lm-human-preferences and TRL.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each `tokens` under softmax(logits / temperature).

    logits: (B, T, V), tokens: (B, T) -> (B, T), float32. Use the same temperature as the
    sampler, or the policy ratio and the KL are measured against the wrong distribution
    (Huang et al. 2024, "The N+ implementation details of RLHF with PPO", detail on temperature).
    """
    if temperature != 1.0:
        # in float32: bf16 logits / T rounds to bf16 again (measured: up to 0.16 nats/token off the sampler)
        logits = logits.float() / temperature  # temporary, freed as soon as log_softmax returns
    # log_softmax then gather: the float32 log-softmax output is the only (B, T, V) tensor kept
    # (autograd saves it for backward). float32 because bf16 log-ratios are too coarse for PPO.
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: (B, T, V) -> (B, T), its gradient finite.

    -inf logits (EOS banned before sampling.min_new_tokens) are tokens of probability 0: they add 0 to the
    entropy and nothing to its gradient. (entr(p) = -p ln p is 0 there too, but its derivative -ln p - 1 is
    inf at p = 0, and inf x 0 made the entropy bonus's backward NaN.)
    """
    logprobs = (logits.float() / temperature).log_softmax(dim=-1)
    return -(logprobs.exp() * logprobs.masked_fill(logprobs == -torch.inf, 0)).sum(-1)


def entropy_bonus(entropy: torch.Tensor, ref_entropy: torch.Tensor | None = None) -> torch.Tensor:
    """The entropy the bonus rewards at each position: (B, T) -> (B, T).

    Without ref_entropy, the policy's entropy itself. With the reference's entropy at the same positions, the
    bonus is capped there: where the policy's entropy is at or below the reference's it is rewarded as usual
    (collapse onto a few replies lowers it), above it the bonus is a constant and pushes nothing. An uncapped
    bonus keeps raising the entropy past the reference's, spending the KL budget on noise the reward never
    asked for. At step 0 the policy is its reference: every position ties and the bonus is the uncapped one.
    """
    if ref_entropy is None:
        return entropy
    return torch.where(entropy <= ref_entropy, entropy, entropy.detach())


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token sample estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

    logprobs, ref_logprobs: (B, T) -> (B, T). Estimators (Schulman, "Approximating KL
    divergence", 2020): k1 = log p - log q (unbiased, can be negative; Ziegler et al. 2019);
    k3 = (r - 1) - log r with r = q/p (unbiased, always >= 0); "abs" = |k1|; "mse" = k1^2 / 2
    (Schulman's k2). Not clamped: callers see extreme log-ratios rather than a silent cap.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def exact_kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0,
                         positions_per_slice: int = 128) -> torch.Tensor:
    """Full-vocabulary KL(pi || pi_ref) per position: sum_v p(v) (log p(v) - log q(v)).

    logits, ref_logits: (..., V) -> (...), float32. The exact quantity k1 and k3 estimate from samples, with
    none of their sampling noise: PPO steers and reports it (rlft.ppo.rollout.forward_passes), eval reports it.
    Computed `positions_per_slice` positions at a time, so the float32 (slice, V) temporaries stay small
    (128 x 49152 floats: 25 MB each) whatever the batch.
    """
    vocab = logits.shape[-1]
    flat, ref_flat = logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], positions_per_slice):
        part = slice(start, start + positions_per_slice)
        logprobs = (flat[part].float() / temperature).log_softmax(dim=-1)
        ref_logprobs = (ref_flat[part].float() / temperature).log_softmax(dim=-1)
        # tokens pi never picks (-inf logits) contribute 0, not 0 * -inf = NaN
        out[part] = torch.where(logprobs > -torch.inf, logprobs.exp() * (logprobs - ref_logprobs), 0).sum(-1)
    return out.reshape(logits.shape[:-1])


def kl_upper_bound(per_sequence_kl: torch.Tensor, z: float = 1.645) -> float:
    """One-sided upper confidence bound on a policy's mean KL per sequence, from the responses it was measured on.

    per_sequence_kl: (n,) the exact KL of each response -> mean + z * std / sqrt(n) (z 1.645: 95%; with n = 1,
    the mean). The KL budget reads it: on the quickstart the KL of single responses spreads by ~3 nats around a
    mean of 6, so a mean of 16 or 32 of them is uncertain by 0.5-0.8 nats, and a policy measured just within the
    budget was past it half the time.
    """
    values = per_sequence_kl.detach().double()
    spread = values.std() / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean() + z * spread)


def logprob_gap(sampler_logprobs: torch.Tensor, logprobs: torch.Tensor,
                response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the sampler's own log-probs of the tokens it drew are from the trainer's recomputed ones.

    sampler_logprobs, logprobs, response_mask: (B, T) -> {"mean", "max": mean and max |difference| per token,
    "kl": the k3 estimate of KL(sampler || trainer) per token} (scalars). 0 when both describe one distribution;
    rounding (bf16 weights, a merged adapter) makes it small, a sampler that decodes another model (a cache
    argument ignored) makes it nats. PPO's ratios and KL are only right when it is small.
    """
    mask = response_mask.bool()
    gap = (sampler_logprobs - logprobs).abs()
    return {"mean": masked_mean(gap, mask), "max": torch.where(mask, gap, 0).max(),
            "kl": masked_mean(kl_penalty(sampler_logprobs, logprobs, "k3"), mask)}


def truncated_importance_weights(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, response_mask: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """min(pi(y_t) / pi_sampler(y_t), cap) per token, 0 at padding: (B, T) from logprobs (the trainer's, at the
    rollout), sampler_logprobs (what the sampling loop computed as it drew), response_mask, all (B, T).

    Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"): the tokens were drawn from the sampler's distribution, which rounding (bf16 decoding vs a
    bf16 full forward) makes differ slightly from the one PPO recomputes; weighting each token's policy loss by
    this ratio corrects for it, and the cap bounds the variance. Every weight is >= 0, so scaling the
    advantages by it scales PPO's clipped loss term for term.
    """
    return torch.where(response_mask.bool(), (logprobs - sampler_logprobs).exp().clamp(max=cap), 0)


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -kl_coef * kl_t on every response token, plus the reward-model score on the last one.

    scores: (B,), kl: (B, T), response_mask: (B, T) -> (rewards (B, T), 0 at padding; sequence_kl (B,),
    the summed per-token KL of each response). The one per-sequence KL of a step: the controller and the
    logs read it from here, so the KL that was penalised is the KL that is steered and reported.
    Rows may have different lengths. A row with no valid token gets no reward at all (its score
    is dropped: there is no token to credit it to). Reference: Ziegler et al. 2019 eq. 2;
    `compute_rewards` in TRL's PPOTrainer; torchtune's `get_rewards_ppo` returns its KL the same way.
    """
    mask = response_mask.bool()
    masked_kl = torch.where(mask, kl, 0)
    rewards = -kl_coef * masked_kl
    # The last set position: the first one in the flipped row. Empty rows point at T - 1,
    # and their score is zeroed below.
    last = mask.shape[-1] - 1 - mask.flip(-1).long().argmax(-1)
    score = torch.where(mask.any(-1), scores.to(rewards.dtype), 0)
    return rewards.scatter_add(-1, last.unsqueeze(-1), score.unsqueeze(-1)), masked_kl.sum(-1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16); returns = advantages + values.

    rewards, values, response_mask: (B, T) -> (advantages, returns), both (B, T), 0 at padding.
    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}. The value after the
    last valid token is 0: the episode ends there, whether at EOS or at the length limit
    (the usual RLHF choice, as in TRL). Assumes right padding (a prefix mask, as from
    `response_mask_from_eos`). Loops backwards over T, vectorised over the batch.
    """
    mask = response_mask.bool()
    rewards = torch.where(mask, rewards, 0)
    values = torch.where(mask, values, 0)  # so V_{t+1} past the end of a row is 0
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage  # stays 0 through right padding
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def grpo_advantages(scores: torch.Tensor, group_size: int, scale_by_std: bool = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised sequence rewards: A_i = (r_i - mean(group)) / (std(group) + eps).

    scores: (B,) with the k = group_size completions of each prompt consecutive -> (B,).
    Shao et al. 2024 (DeepSeekMath, GRPO, outcome supervision) and TRL's GRPOTrainer (unbiased std,
    eps 1e-4). `scale_by_std=False` keeps only the centring, as Dr. GRPO (Liu et al. 2025) argues:
    dividing by the std up-weights prompts whose completions all score alike.
    """
    grouped = scores.view(-1, group_size)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (grouped.std(1, keepdim=True) + eps)
    return advantages.flatten()


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j within each prompt's group.

    scores: (B,) in consecutive groups of k = group_size -> (B,). Ahmadian et al. 2024 ("Back to
    basics", eq. 5), after Kool et al. 2019: the baseline of each sample is the mean of the others, so
    it is unbiased; (k r_i - sum_j r_j) / (k - 1) computes it in one pass.
    """
    grouped = scores.view(-1, group_size)
    return ((group_size * grouped - grouped.sum(1, keepdim=True)) / (group_size - 1)).flatten()


def reinforce_pp_advantages(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE++: returns-to-go of the per-token rewards, normalised over the whole batch.

    rewards, response_mask: (B, T) -> (B, T), 0 at padding. rewards are `per_token_rewards` (the KL
    penalty on every token, the score on the last); G_t = sum_{s >= t} r_s (gamma = 1), then whitened
    across all tokens of the batch instead of per prompt group (Hu 2025, "REINFORCE++", sec. 3).
    """
    mask = response_mask.bool()
    returns = torch.where(mask, rewards, 0).flip(-1).cumsum(-1).flip(-1)
    return masked_whiten(returns, mask)


def aggregate(per_token: torch.Tensor, response_mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    """A loss from per-token terms: "token_mean" = sum over valid tokens / their count (every token weighs
    the same; long answers weigh more), "sequence_mean" = the mean over sequences of each one's token mean
    (every answer weighs the same, GRPO's original form). per_token, response_mask: (B, T) -> scalar."""
    mask = response_mask.float()
    if mode == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if mode == "sequence_mean":
        lengths = mask.sum(-1)
        per_sequence = (per_token * mask).sum(-1) / lengths.clamp(min=1)
        return per_sequence[lengths > 0].sum() / (lengths > 0).sum().clamp(min=1)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected token_mean or sequence_mean")


def loss_mask(response_mask: torch.Tensor, ended_with_eos: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """The tokens the losses average over: the response's, less every token of a reply cut at the length limit
    when `mask_truncated` (DAPO's overlong filtering, Yu et al. 2025 sec. 3.4: a cut reply's score says little
    about its tokens). response_mask: (B, T) bool, ended_with_eos: (B,) bool -> (B, T) bool."""
    return response_mask & ended_with_eos[:, None] if mask_truncated else response_mask


def frac_zero_std(scores: torch.Tensor, group_size: int) -> float:
    """Share of prompt groups whose `group_size` scores are all equal: groups a group-relative estimator learns
    nothing from (TRL's frac_reward_zero_std). scores: (B,), B a multiple of group_size, groups consecutive."""
    groups = scores.view(-1, group_size)
    return (groups == groups[:, :1]).all(-1).float().mean().item()


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float,
    aggregation: str = "token_mean",
    clip_range_high: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), aggregated over tokens (see `aggregate`).

    logprobs, old_logprobs, advantages, response_mask: (B, T) -> (scalar loss, stats).
    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))), eps_low = clip_range and
    eps_high = clip_range_high, or clip_range when 0 (DAPO's clip-higher, Yu et al. 2025, eq. 10, raises it).
    stats (detached scalars): `clipfrac`, share of tokens where the clipped term won; `clipfrac_low` of them
    with A < 0 and the ratio under 1 - eps_low, `clipfrac_high` with A > 0 and the ratio over 1 + eps_high;
    `approxkl`, 0.5 * mean((logp - old)^2), the k2 estimator TRL logs (Huang et al. 2024);
    `ratio`, the mean probability ratio.
    """
    high = clip_range_high or clip_range
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), response_mask, aggregation)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
            "clipfrac_low": masked_mean(((ratio < 1 - clip_range) & (advantages < 0)).float(), response_mask),
            "clipfrac_high": masked_mean(((ratio > 1 + high) & (advantages > 0)).float(), response_mask),
            "approxkl": 0.5 * masked_mean(log_ratio.square(), response_mask),
            "ratio": masked_mean(ratio, response_mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean(max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2)).

    values, old_values, returns, response_mask: (B, T) -> (scalar loss, {"clipfrac"}).
    Reference: openai/baselines ppo2 `vf_loss`; Huang et al. 2024 (value function clipping).
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    unclipped_loss = (values - returns).square()
    clipped_loss = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), response_mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), response_mask)}
    return loss, stats


class FixedKLController:
    """Constant KL coefficient, with the same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient steered towards a target KL (Ziegler et al. 2019, section 2.2, eq. 3).

    error = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon,
    where n_steps is the number of samples since the last update (the batch size).
    Reference: `AdaptiveKLController` in openai/lm-human-preferences, train_policy.py.
    target and horizon are configuration; only `value` is checkpointed.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class PIKLController:
    """Beta steered to a target KL by a proportional-integral law on log beta, with anti-windup.

    error = clip(current_kl / target - 1, -0.2, 0.2); integral = max(0, integral + error * n_steps / horizon);
    log value = log init + proportional_gain * clip(current_kl / target - 1, -1, 1) + integral.
    Ziegler's controller (AdaptiveKLController) is the integral alone, unclamped: in a short run the KL starts
    at 0, so beta falls for the first steps, and by the time the drifting KL crosses the target beta is too low
    to hold it (measured: beta 0.1 -> 0.016 while KL rose past 6 with target 3). Clamping the integral at 0
    keeps no memory of being under budget, and the proportional term answers an overshoot at once (the
    PID-Lagrangian argument of Stooke et al. 2020, "Responsive Safety in RL by PID Lagrangian Methods").
    floor: beta never below it. Under target the proportional term lowers beta to as little as init / e, and at
    that beta a policy that finds a reply the reward model likes reaches it within the KL target before beta
    can answer. Only `integral` and `value` are checkpointed.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, proportional_gain: float = 1.0,
                 floor: float = 0.0):
        self.init, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)
        self.proportional_gain, self.floor = float(proportional_gain), float(floor)
        self.integral = 0.0
        self.value = self.init

    def update(self, current_kl: float, n_steps: int) -> None:
        relative = float(current_kl) / self.target - 1
        self.integral = max(0.0, self.integral + min(max(relative, -0.2), 0.2) * n_steps / self.horizon)
        self.value = max(self.floor, self.init * math.exp(
            self.proportional_gain * min(max(relative, -1.0), 1.0) + self.integral))

    def state_dict(self) -> dict:
        return {"value": self.value, "integral": self.integral}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.integral = float(state["value"]), float(state["integral"])
