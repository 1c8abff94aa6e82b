"""Hand-checkable tests of the PPO/RLHF math in rlft.ppo.core; comments show the arithmetic."""

import itertools
import math

import pytest
import torch

from rlft.generation import first_true_index, response_mask_from_eos
from rlft.ppo.core import (
    entropy_bonus,
    frac_zero_std,
    loss_mask,
    AdaptiveKLController,
    PIKLController,
    kl_upper_bound,
    FixedKLController,
    entropy_from_logits,
    exact_kl_from_logits,
    gae,
    kl_penalty,
    logprob_gap,
    logprobs_from_logits,
    truncated_importance_weights,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)

E = math.e


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=atol, rtol=0)


# --- masked statistics -------------------------------------------------------------------------


def test_masked_mean_and_var_ignore_padding():
    # valid values 2, 4, 6: mean 4; squared deviations 4, 0, 4 -> biased var 8/3, unbiased 8/2 = 4
    x = torch.tensor([[2.0, 4.0, 6.0, 1e9]])
    mask = torch.tensor([[1, 1, 1, 0]])
    close(masked_mean(x, mask), 4.0)
    close(masked_var(x, mask), 4.0)
    close(masked_var(x, mask, unbiased=False), 8 / 3)
    # per row: row 0 is (1 + 3) / 2 = 2, row 1 is 10 / 1
    rows = torch.tensor([[1.0, 3.0, 100.0], [10.0, -5.0, -5.0]])
    close(masked_mean(rows, torch.tensor([[1, 1, 0], [1, 0, 0]]), dim=1), [2.0, 10.0])


def test_masked_whiten_hand_values_and_padding_is_ignored():
    # mean 4, unbiased std 2 -> (2-4)/2, (4-4)/2, (6-4)/2 = -1, 0, 1; padded slot comes back 0
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.tensor([[2.0, 4.0, 123.0], [6.0, -7.0, 55.0]])
    close(masked_whiten(x, mask), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], atol=1e-4)
    # shift_mean=False adds the mean 4 back: 3, 4, 5
    close(masked_whiten(x, mask, shift_mean=False), [[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]], atol=1e-4)
    # arbitrary garbage (even NaN / inf) in padded slots changes nothing
    garbage = x.clone()
    garbage[~mask] = torch.tensor([float("nan"), float("inf"), -1e30])
    close(masked_whiten(garbage, mask), masked_whiten(x, mask))


# --- log-probs, entropy, KL --------------------------------------------------------------------


def test_logprobs_from_logits_hand_value_and_temperature():
    # logits (0, ln 3): softmax = (1/4, 3/4). At temperature 2 the logits halve to (0, ln 3 / 2),
    # i.e. (1, sqrt 3) / (1 + sqrt 3), so token 0 gets log(1 / (1 + sqrt 3)).
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    close(logprobs_from_logits(logits, torch.tensor([[1]])), [[math.log(0.75)]])
    close(logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0), [[-math.log(1 + math.sqrt(3))]])
    # random case: equals gather of log_softmax(logits / T), not of log_softmax(logits)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen) * 3
    tokens = torch.randint(0, 7, (2, 5), generator=gen)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    actual = logprobs_from_logits(logits, tokens, temperature=0.7)
    close(actual, expected)
    assert actual.shape == (2, 5)
    assert not torch.allclose(actual, logprobs_from_logits(logits, tokens))


def test_entropy_from_logits():
    # uniform over 4 tokens: ln 4. (1/4, 3/4): -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf]]])
    close(entropy_from_logits(logits), [[math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    # temperature 1/2 doubles the logits: (1, 9) / 10 -> -(0.1 ln 0.1 + 0.9 ln 0.9) = 0.3251
    close(entropy_from_logits(logits[:, 1:], temperature=0.5), [[-(0.1 * math.log(0.1) + 0.9 * math.log(0.9))]])


def test_entropy_gradient_is_finite_where_a_token_is_banned():
    """A banned token (-inf logit, as EOS before min_new_tokens) has probability 0: no entropy, no gradient. The
    gradient of the entropy H = -sum p ln p over the logits is -p_i (ln p_i + H): for (1/4, 3/4, banned) that is
    (-(1/4)(ln 1/4 + H), -(3/4)(ln 3/4 + H), 0)."""
    logits = torch.tensor([0.0, math.log(3.0), -math.inf], requires_grad=True)
    entropy = entropy_from_logits(logits)
    entropy.backward()
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy, h)
    close(logits.grad, [-0.25 * (math.log(0.25) + h), -0.75 * (math.log(0.75) + h), 0.0])


def test_entropy_bonus_capped_at_the_reference_by_hand():
    """Capped, the bonus is the entropy everywhere, but pushes (gradient 1) only where it is at or below the
    reference's: positions 0 and 1 here (1 < 2, 2 = 2), not position 2 (3 > 2). Uncapped it pushes everywhere."""
    ref = torch.tensor([[2.0, 2.0, 2.0]])
    for cap, pushed in ((ref, [[1.0, 1.0, 0.0]]), (None, [[1.0, 1.0, 1.0]])):
        entropy = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
        bonus = entropy_bonus(entropy, cap)
        close(bonus.detach(), [[1.0, 2.0, 3.0]])
        bonus.sum().backward()
        close(entropy.grad, pushed)


def test_kl_estimators_on_hand_values():
    # token 0: logp - logq = -1 - (-2) = +1; token 1: logp - logq = -2 - (-1) = -1
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref_logprobs = torch.tensor([[-2.0, -1.0]])
    close(kl_penalty(logprobs, ref_logprobs, "k1"), [[1.0, -1.0]])
    close(kl_penalty(logprobs, ref_logprobs, "abs"), [[1.0, 1.0]])
    close(kl_penalty(logprobs, ref_logprobs, "mse"), [[0.5, 0.5]])
    # k3 = (r - 1) - ln r with r = exp(ref - logp): r = 1/e -> 1/e - 1 + 1 = 1/e; r = e -> e - 1 - 1 = e - 2
    close(kl_penalty(logprobs, ref_logprobs, "k3"), [[1 / E, E - 2]])


def test_kl_estimators_vanish_when_policies_agree():
    logprobs = -torch.rand(3, 4) * 5
    for estimator in ("k1", "k3", "abs", "mse"):
        close(kl_penalty(logprobs, logprobs.clone(), estimator), torch.zeros(3, 4))


def test_unknown_kl_estimator_names_the_valid_ones():
    with pytest.raises(ValueError, match="k1, k3, abs, mse"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k2")


def test_exact_kl_hand_values():
    logits = torch.randn(2, 3, 5)
    close(exact_kl_from_logits(logits, logits.clone()), torch.zeros(2, 3))
    # p = (1/2, 1/2), q = softmax(0, ln 3) = (1/4, 3/4):
    # KL(p||q) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.14384
    uniform = torch.tensor([[[0.0, 0.0]]])
    skewed = torch.tensor([[[0.0, math.log(3.0)]]])
    close(exact_kl_from_logits(uniform, skewed), [[0.5 * math.log(4 / 3)]])
    # reversed, KL(q||p) = 1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2) = -0.17329 + 0.30410 = 0.13081 (not symmetric)
    close(exact_kl_from_logits(skewed, uniform), [[0.25 * math.log(0.5) + 0.75 * math.log(1.5)]])
    # temperature 2 on logits (0, 2 ln 3) gives (0, ln 3) again, so this is the same 0.13081
    close(exact_kl_from_logits(skewed * 2, uniform, temperature=2.0), [[0.25 * math.log(0.5) + 0.75 * math.log(1.5)]])
    # a token pi bans (-inf logit) adds 0 * ln(0 / q) = 0. q = (1/5, 3/5, 1/5):
    # KL = 1/2 ln(1/2 / 1/5) + 1/2 ln(1/2 / 3/5) + 0 = 1/2 ln 2.5 + 1/2 ln(5/6) = 0.4581 - 0.0912 = 0.3670
    banned = torch.tensor([[[0.0, 0.0, -math.inf]]])
    ref = torch.tensor([[[0.0, math.log(3.0), 0.0]]])
    close(exact_kl_from_logits(banned, ref), [[0.5 * math.log(2.5) + 0.5 * math.log(5 / 6)]])


def test_exact_kl_is_the_expectation_of_k1_and_k3_samples():
    # p = (.5, .3, .2), q = (.2, .3, .5): KL = .5 ln 2.5 + .3 ln 1 + .2 ln .4 = 0.4581 - 0.1833 = 0.2749.
    # The k1 samples have std ~0.72, so with 200k samples the standard error is ~0.0016.
    logits = torch.tensor([0.5, 0.3, 0.2]).log().view(1, 1, 3)
    ref_logits = torch.tensor([0.2, 0.3, 0.5]).log().view(1, 1, 3)
    exact = exact_kl_from_logits(logits, ref_logits).item()
    assert exact == pytest.approx(0.5 * math.log(2.5) + 0.2 * math.log(0.4), abs=1e-5)
    n = 200_000
    tokens = torch.multinomial(logits.view(3).exp(), n, replacement=True, generator=torch.Generator().manual_seed(0))
    tokens = tokens.view(1, n)
    logprobs = logprobs_from_logits(logits.expand(1, n, 3), tokens)
    ref_logprobs = logprobs_from_logits(ref_logits.expand(1, n, 3), tokens)
    assert kl_penalty(logprobs, ref_logprobs, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_penalty(logprobs, ref_logprobs, "k3").mean().item() == pytest.approx(exact, abs=0.01)


def test_exact_kl_in_slices_equals_one_pass():
    # slices of 3 positions over 2 x 5 positions (the last slice short): the same numbers as one pass
    logits, ref_logits = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    whole = exact_kl_from_logits(logits, ref_logits, positions_per_slice=100)
    torch.testing.assert_close(exact_kl_from_logits(logits, ref_logits, positions_per_slice=3), whole)
    assert whole.shape == (2, 5) and (whole > 0).all()


def test_logprob_gap_by_hand():
    # row 0: gaps |(-1) - (-1.5)| = 0.5 and |(-2) - (-2)| = 0; row 1: one token, gap 0.1; the padded slot's 9 is ignored
    sampler = torch.tensor([[-1.0, -2.0], [-0.2, 9.0]])
    trainer = torch.tensor([[-1.5, -2.0], [-0.3, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    gap = logprob_gap(sampler, trainer, mask)
    close(gap["mean"], (0.5 + 0 + 0.1) / 3)
    close(gap["max"], 0.5)
    # k3 of log r = sampler - trainer: d = 0.5 -> e^-0.5 - 1 + 0.5 = 0.10653; d = 0 -> 0; d = 0.1 -> 0.00484
    close(gap["kl"], (math.exp(-0.5) - 0.5 + math.exp(-0.1) - 0.9) / 3)
    close(logprob_gap(trainer, trainer, mask)["mean"], 0.0)


def test_truncated_importance_weights_by_hand():
    # trainer log-prob -1 vs sampler -1.5: ratio e^0.5 = 1.6487; -1 vs -3: e^2 = 7.39, capped at 2; -2 vs -1:
    # e^-1 = 0.3679 (never raised to anything); the padded slot is 0 whatever its values
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
    sampler = torch.tensor([[-1.5, -3.0], [-1.0, -5.0]])
    mask = torch.tensor([[True, True], [True, False]])
    close(truncated_importance_weights(logprobs, sampler, mask, cap=2.0), [[math.exp(0.5), 2.0], [math.exp(-1), 0.0]])
    # scaling the advantages by the weights scales PPO's clipped loss token for token (weights are >= 0)
    advantages, ratio_logprobs = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[-0.8, -1.3], [-2.2, 0.0]])
    weights = truncated_importance_weights(logprobs, sampler, mask, cap=2.0)
    weighted, _ = policy_loss(ratio_logprobs, logprobs, advantages * weights, mask, 0.2, "token_mean")
    plain_terms = []
    for row, col in [(0, 0), (0, 1), (1, 0)]:
        one = torch.zeros_like(mask)
        one[row, col] = True
        loss, _ = policy_loss(ratio_logprobs, logprobs, advantages, one, 0.2, "token_mean")
        plain_terms.append(weights[row, col] * loss)
    close(weighted, sum(plain_terms) / 3)


def test_k1_in_the_reward_has_the_gradient_of_the_sequence_kl_and_the_exact_kl_does_not():
    """Brute force over every sequence of a tiny autoregressive model (3 tokens, length 3: 27 sequences, the
    logits a free table per prefix). PPO's step with -k1 on every token of the reward (per_token_rewards, then
    gae with gamma = lam = 1, then policy_loss) has in expectation exactly the gradient of -E_pi[sum_t log pi
    - log pi_ref], the sequence KL. The exact per-token KL as the reward does not: it misses the direct
    derivative of KL(pi(.|s_t) || pi_ref(.|s_t)) at s_t, and adding that term back recovers the truth."""
    torch.manual_seed(0)
    vocab, length = 3, 3
    prefixes = [p for n in range(length) for p in itertools.product(range(vocab), repeat=n)]
    index = {prefix: i for i, prefix in enumerate(prefixes)}
    theta = torch.randn(len(prefixes), vocab, dtype=torch.float64, requires_grad=True)  # the policy
    ref_table = torch.randn(len(prefixes), vocab, dtype=torch.float64)
    sequences = list(itertools.product(range(vocab), repeat=length))
    rows = torch.tensor([[index[seq[:t]] for t in range(length)] for seq in sequences])  # (27, 3) prefix per token
    tokens = torch.tensor(sequences)
    logits, ref_logits = theta[rows], ref_table[rows]  # (27, 3, 3)
    logprobs = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    ref_logprobs = ref_logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    prob = logprobs.sum(-1).exp()  # pi(y) of each whole sequence; they sum to 1
    close(prob.sum(), 1.0)
    # the truth: d/dtheta of E_pi[sum_t log pi(y_t|y<t) - log pi_ref(y_t|y<t)]
    expected_kl = (prob * (logprobs - ref_logprobs).sum(-1)).sum()
    truth, = torch.autograd.grad(expected_kl, theta, retain_graph=True)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    count = mask.numel()

    def expected_ppo_gradient(per_token_kl):
        """E_pi of the policy-loss gradient at ratio 1, rewards -kl per token: each sequence's loss weighted by
        pi(y) (times the token count, which token_mean divides by again)."""
        rewards, _ = per_token_rewards(torch.zeros(len(tokens)), per_token_kl.detach(), 1.0, mask)
        advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
        weighted = advantages * prob.detach()[:, None] * count
        loss, _ = policy_loss(logprobs, logprobs.detach(), weighted, mask, clip_range=0.2)
        return torch.autograd.grad(loss, theta, retain_graph=True)[0]

    k1 = kl_penalty(logprobs, ref_logprobs, "k1")
    torch.testing.assert_close(expected_ppo_gradient(k1), truth)  # unbiased: what rlft ships
    exact = exact_kl_from_logits(logits, ref_logits).double()
    biased = expected_ppo_gradient(exact)
    assert (biased - truth).abs().max() > 0.05
    # the missing term: the exact KL's own derivative at every visited state
    direct, = torch.autograd.grad((prob.detach()[:, None] * exact_kl_from_logits(logits, ref_logits)).sum(), theta)
    torch.testing.assert_close(biased + direct.double(), truth, atol=1e-5, rtol=1e-4)


# --- rewards and advantages --------------------------------------------------------------------


def test_per_token_rewards_puts_score_on_last_valid_token_of_ragged_rows():
    # rows of length 3, 1 and 0; kl_coef 0.5 so each valid token gets -0.5 * kl
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    scores = torch.tensor([1.0, 2.0, 3.0])
    rewards, sequence_kl = per_token_rewards(scores, kl, 0.5, mask)
    # row 0: -0.05, -0.1, -0.15 + 1 = 0.85; row 1: -0.2 + 2 = 1.8 then padding; row 2: empty, score dropped
    close(rewards, [[-0.05, -0.1, 0.85], [1.8, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(sequence_kl, [0.6, 0.4, 0.0])  # padding's 9s never count


def test_gae_three_step_hand_example():
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72), rewards (1, 0, 2), values (0.5, 1.0, 1.5), V after the end = 0
    # t=2: delta = 2 + 0.9*0   - 1.5 = 0.5;   A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35;  A1 = 0.35 + 0.72*0.5  = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;   A0 = 1.4  + 0.72*0.71 = 1.9112
    # returns = A + V = (2.4112, 1.71, 2.0)
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    close(advantages, [[1.9112, 0.71, 0.5]])
    close(returns, [[2.4112, 1.71, 2.0]])


def test_gae_padding_changes_nothing_and_each_row_bootstraps_zero_at_its_own_end():
    # Row 0 is the hand example above padded with garbage; row 1 stops after two tokens, so
    # t=1: delta = 0 + 0.9*0 - 1.0 = -1.0; A1 = -1.0.  t=0: delta = 1.4; A0 = 1.4 + 0.72*(-1.0) = 0.68
    rewards = torch.tensor([[1.0, 0.0, 2.0, 50.0, -7.0], [1.0, 0.0, 2.0, 50.0, -7.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 30.0, 4.0], [0.5, 1.0, 1.5, 30.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[1.9112, 0.71, 0.5, 0.0, 0.0], [0.68, -1.0, 0.0, 0.0, 0.0]])
    close(returns, [[2.4112, 1.71, 2.0, 0.0, 0.0], [1.18, 0.0, 0.0, 0.0, 0.0]])


# --- losses ------------------------------------------------------------------------------------


def test_policy_loss_clip_cases():
    # clip_range 0.2, one token per case, log-ratio +-1 so ratio is e or 1/e:
    #  A=+1, ratio e:   -e = -2.718 vs clipped -1.2    -> max -1.2    (clipped)
    #  A=+1, ratio 1/e: -0.368      vs clipped -0.8    -> max -0.368  (not clipped)
    #  A=-1, ratio e:    2.718      vs clipped  1.2    -> max  2.718  (not clipped)
    #  A=-1, ratio 1/e:  0.368      vs clipped  0.8    -> max  0.8    (clipped)
    # a fifth, padded token with a huge ratio must not count
    old_logprobs = torch.full((1, 5), -2.0)
    logprobs = (old_logprobs + torch.tensor([[1.0, -1.0, 1.0, -1.0, 9.0]])).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    close(loss, (-1.2 - 1 / E + E + 0.8) / 4)
    close(stats["clipfrac"], 0.5)
    close(stats["approxkl"], 0.5)  # 0.5 * mean(1, 1, 1, 1)
    close(stats["ratio"], (E + 1 / E) / 2)  # (2e + 2/e) / 4
    # one case at a time, so clipfrac must pick out exactly the clipped ones
    for i, expected in enumerate([1.0, 0.0, 0.0, 1.0]):
        one = slice(i, i + 1)
        _, single = policy_loss(logprobs[:, one], old_logprobs[:, one], advantages[:, one], mask[:, one], 0.2)
        close(single["clipfrac"], expected)
    # ratio e^0.1 = 1.105 is inside (0.8, 1.2): both terms are equal, so nothing counts as clipped
    _, inside = policy_loss(torch.tensor([[0.1]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    close(inside["clipfrac"], 0.0)
    # clipped tokens and padding get no gradient; unclipped ones get -A * ratio / 4
    loss.backward()
    close(logprobs.grad, [[0.0, -1 / E / 4, E / 4, 0.0, 0.0]])


def test_clip_higher_and_which_side_clipped():
    # clip_range 0.2 below, clip_range_high 0.28 above; log-ratios 0.25 (ratio 1.284) and -0.25 (ratio 0.779):
    #  A=+1, ratio 1.284: over 1.28, so clipped at 1.28: -1.28 vs -1.284 -> max -1.28   (clipped high)
    #  A=-1, ratio 0.779: under 0.8, so clipped at 0.8:   0.8  vs  0.779 -> max  0.8    (clipped low)
    #  A=+1, ratio 0.779: the unclipped -0.779 wins over -0.8                          (not clipped)
    #  A=+1, ratio 1.2 (log 0.18232): inside 1.28, so not clipped (at clip_range 0.2 alone it was the edge)
    old = torch.zeros(1, 4)
    logprobs = torch.tensor([[0.25, -0.25, -0.25, math.log(1.2)]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones(1, 4)
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2, clip_range_high=0.28)
    close(loss, (-1.28 + 0.8 - math.exp(-0.25) - 1.2) / 4)
    close(stats["clipfrac_high"], 0.25)
    close(stats["clipfrac_low"], 0.25)
    close(stats["clipfrac"], 0.5)
    symmetric, _ = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)  # clip_range_high 0: 0.2 both ways
    close(symmetric, (-1.2 + 0.8 - math.exp(-0.25) - 1.2) / 4)


def test_loss_mask_drops_truncated_replies_only_when_asked():
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    ended = torch.tensor([False, True, True])  # the first reply was cut at the length limit
    assert torch.equal(loss_mask(response_mask, ended, False), response_mask)
    assert loss_mask(response_mask, ended, True).tolist() == [[False] * 3, [True, True, False], [True, False, False]]


def test_frac_zero_std_counts_groups_that_tie():
    # groups of 3: (1, 1, 1) ties, (0, 1, 0) does not, (-2, -2, -2) ties: 2 of 3
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, -2.0, -2.0, -2.0])
    assert frac_zero_std(scores, 3) == pytest.approx(2 / 3)
    assert frac_zero_std(torch.tensor([0.5, 0.5]), 1) == 1.0  # a group of one always ties


def test_value_loss_clipping():
    # old value 0, clip 0.2, return 1:
    #  v=1:   (1-1)^2 = 0     vs (0.2-1)^2 = 0.64  -> 0.64 (clipped)
    #  v=0.1: (0.1-1)^2 = 0.81 both                -> 0.81
    #  v=-1:  (-1-1)^2 = 4    vs (-0.2-1)^2 = 1.44 -> 4
    # loss = 0.5 * (0.64 + 0.81 + 4) / 3 = 0.908333; a padded fourth token does not count
    values = torch.tensor([[1.0, 0.1, -1.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, torch.zeros(1, 4), torch.ones(1, 4), mask, clip_range_value=0.2)
    close(loss, 0.5 * (0.64 + 0.81 + 4.0) / 3)
    close(stats["clipfrac"], 1 / 3)


# --- KL controllers ----------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_towards_target_with_clamped_error():
    # target 6, horizon 10000, n_steps 100 -> mult = 1 + error * 0.01
    def updated(current_kl):
        controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
        controller.update(current_kl, n_steps=100)
        return controller.value

    assert updated(6.6) == pytest.approx(0.1 * 1.001)  # error 6.6/6 - 1 = 0.1, inside the clamp
    assert updated(12.0) == pytest.approx(0.1 * 1.002)  # error 1.0 clamped to 0.2: beta rises
    assert updated(3.0) == pytest.approx(0.1 * 0.998)  # error -0.5 clamped to -0.2: beta falls
    assert updated(6.0) == pytest.approx(0.1)


def test_pi_kl_controller_by_hand():
    # init 0.1, target 3, horizon 16, 16 samples a step: the integral moves by the clipped error each step
    controller = PIKLController(0.1, target=3.0, horizon=16)
    controller.update(6.0, n_steps=16)  # relative error 1: integral 0.2, proportional 1
    assert controller.value == pytest.approx(0.1 * math.exp(1.2))
    controller.update(6.0, n_steps=16)  # integral 0.4
    assert controller.value == pytest.approx(0.1 * math.exp(1.4))
    controller.update(0.0, n_steps=16)  # error -1: integral back to 0.2, proportional -1
    assert controller.value == pytest.approx(0.1 * math.exp(-0.8))
    controller.update(30.0, n_steps=16)  # error 9: both parts clipped, to 0.2 and 1
    assert controller.value == pytest.approx(0.1 * math.exp(1.4))


def test_pi_kl_controller_keeps_no_memory_of_being_under_budget():
    # Five steps at KL 0 (a run's start), then one at the target: Ziegler's controller has lowered beta
    # by 0.8^5 and keeps it there; the PI controller's integral stayed at 0, so beta is back at its init.
    pi, ziegler = PIKLController(0.1, 3.0, 16), AdaptiveKLController(0.1, 3.0, 16)
    for kl in (0.0,) * 5 + (3.0,):
        pi.update(kl, n_steps=16)
        ziegler.update(kl, n_steps=16)
    assert pi.value == pytest.approx(0.1) and pi.integral == 0.0
    assert ziegler.value == pytest.approx(0.1 * 0.8**5)



def test_pi_kl_controller_floor():
    # init 0.1, floor 0.1: under target the proportional term would lower beta to 0.1 / e; the floor holds it
    # at 0.1. Over target it rises as without a floor: error 1 -> integral 0.2, proportional 1.
    floored, free = PIKLController(0.1, 3.0, 16, floor=0.1), PIKLController(0.1, 3.0, 16)
    for controller in (floored, free):
        controller.update(0.0, n_steps=16)
    assert free.value == pytest.approx(0.1 / math.e) and floored.value == 0.1
    for controller in (floored, free):
        controller.update(6.0, n_steps=16)
    assert floored.value == free.value == pytest.approx(0.1 * math.exp(1.2))


def test_kl_upper_bound_by_hand():
    # KL 2, 4, 6, 8: mean 5, sample std sqrt(20 / 3) = 2.582, over sqrt(4) = 1.291; 95% one-sided: + 1.645 x that
    bound = kl_upper_bound(torch.tensor([2.0, 4.0, 6.0, 8.0]))
    assert bound == pytest.approx(5 + 1.645 * math.sqrt(20 / 3) / 2)
    assert kl_upper_bound(torch.tensor([3.0])) == 3.0  # one response: no spread to bound by
    assert kl_upper_bound(torch.full((16,), 6.0)) == 6.0

def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=64)
    assert controller.value == 0.05


def test_kl_controller_state_round_trips():
    controller = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    for kl in (12.0, 3.0, 8.0):
        controller.update(kl, n_steps=64)
    restored = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value != 0.2
    controller.update(9.0, n_steps=64)
    restored.update(9.0, n_steps=64)
    assert restored.value == controller.value
    pi = PIKLController(0.2, 6.0, 16)
    for kl in (12.0, 3.0, 8.0):
        pi.update(kl, n_steps=16)
    restored_pi = PIKLController(0.2, 6.0, 16)
    restored_pi.load_state_dict(pi.state_dict())
    pi.update(9.0, n_steps=16)
    restored_pi.update(9.0, n_steps=16)
    assert (restored_pi.value, restored_pi.integral) == (pi.value, pi.integral) and pi.integral > 0
    fixed = FixedKLController(0.0)
    fixed.load_state_dict(FixedKLController(0.3).state_dict())
    assert fixed.value == 0.3


# --- response masks ----------------------------------------------------------------------------


def test_first_true_index():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert first_true_index(bools).tolist() == [1, 3, 0]


def test_response_mask_stops_after_first_eos_including_it():
    eos = 2
    ids = torch.tensor(
        [
            [5, eos, 7, eos],  # ends at the first EOS; tokens after it are out even if another EOS follows
            [5, 6, 7, 8],  # no EOS: truncated at the length limit, all valid
            [eos, eos, eos, eos],  # pad == eos (SmolLM): only the first counts
            [5, 6, 7, eos],  # EOS on the last position
        ]
    )
    mask, ended = response_mask_from_eos(ids, eos_token_id=eos, pad_token_id=eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert mask.dtype == torch.bool
    assert ended.tolist() == [True, False, True, True]


def test_response_mask_with_distinct_pad_token():
    eos, pad = 2, 0
    ids = torch.tensor([[5, eos, pad, pad], [5, 6, pad, pad], [5, 6, 7, 8], [5, pad, eos, pad]])
    mask, ended = response_mask_from_eos(ids, eos_token_id=eos, pad_token_id=pad)
    # rows 1 and 3 are padded before any EOS: they end before the first pad, not with EOS
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, False, False]


def test_temperature_divides_bf16_logits_in_float32():
    """bf16 logits / T would round to bf16 again (up to 0.16 nats/token off the sampler, which divides in fp32)."""
    from rlft.ppo.core import logprobs_from_logits

    logits = (torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(0)) * 8).bfloat16()
    tokens = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    exact = (logits.float() / 0.7).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens, 0.7), exact, atol=1e-6, rtol=0)


def test_grpo_advantages_by_hand():
    from rlft.ppo.core import grpo_advantages

    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])  # two prompts, two completions each
    # group 1: mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2); group 2: all alike -> 0
    expected = torch.tensor([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4), 0.0, 0.0])
    torch.testing.assert_close(grpo_advantages(scores, 2), expected)
    # Dr. GRPO: centred only
    torch.testing.assert_close(grpo_advantages(scores, 2, scale_by_std=False), torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_rloo_advantages_by_hand():
    from rlft.ppo.core import rloo_advantages

    # each score minus the mean of the other two: 1 - (3+5)/2 = -3, 3 - (1+5)/2 = 0, 5 - (1+3)/2 = 3
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 3.0, 5.0, 0.0, 0.0, 6.0]), 3),
                               torch.tensor([-3.0, 0.0, 3.0, -3.0, -3.0, 6.0]))


def test_reinforce_pp_advantages_by_hand():
    from rlft.ppo.core import reinforce_pp_advantages

    rewards = torch.tensor([[0.1, 0.2, 1.0], [0.5, 9.0, 9.0]])  # 9s sit on padding: ignored
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    # returns-to-go 1.3, 1.2, 1.0 and 0.5: mean 1.0, unbiased var (0.09 + 0.04 + 0 + 0.25) / 3
    std = math.sqrt(0.38 / 3)
    expected = torch.tensor([[0.3 / std, 0.2 / std, 0.0], [-0.5 / std, 0.0, 0.0]])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask), expected, atol=1e-5, rtol=1e-5)


def test_loss_aggregation_by_hand():
    from rlft.ppo.core import aggregate

    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(10 / 4)  # (1+2+3+4) / 4 tokens
    assert aggregate(per_token, mask, "sequence_mean").item() == pytest.approx((2 + 4) / 2)  # empty row skipped


def fake_measured(kl: float, collapsed: bool = False):
    """A Measured as rlft.ppo.train.measure_result gives it, with the bound 10% over the mean."""
    from rlft.ppo.train import Measured

    return Measured(kl, 1.1 * kl, {"collapsed": collapsed, "warnings": []})


def test_the_next_scale_follows_the_kl_as_a_power_of_the_factor():
    from rlft.ppo.scale import next_factor

    # one point: KL quadratic in the step, so 4 nats at 1 -> 6 at sqrt(6 / 4) = 1.2247
    assert next_factor({1.0: 4.0}, 6.0, 2.0) == pytest.approx(math.sqrt(1.5))
    assert next_factor({1.0: 4.0}, 6.0, 1.1) == 1.1  # capped
    assert next_factor({1.0: 12.0}, 6.0, 2.0) == pytest.approx(math.sqrt(0.5))
    # two points of KL = 4 f^3: the power fitted is 3 (log(32/4) / log 2), so 6 nats at (6/4)^(1/3)
    assert next_factor({1.0: 4.0, 2.0: 32.0}, 6.0, 3.0) == pytest.approx(1.5 ** (1 / 3))


def test_the_result_lands_on_the_target_scaled_up_or_down_never_collapsed_or_past_the_budget():
    from rlft.ppo.scale import LANDED, land_on_target

    def policy(kl_at_one, collapse_above=float("inf")):
        calls = []

        def measure(factor):
            calls.append(factor)
            return fake_measured(kl_at_one * factor ** 2, collapsed=factor > collapse_above)
        return measure, calls

    # under the target (beta held at its floor): scaled up, on the target in one measurement (KL exactly quadratic)
    measure, calls = policy(4.0)
    landing = land_on_target(measure, fake_measured(4.0), 6.0, 7.5, 1.5)
    assert calls == [round(math.sqrt(1.5), 4)] and landing.factor == calls[0]
    assert abs(landing.measured.kl / 6.0 - 1) < 1e-3 and set(landing.tried) == {1.0, calls[0]}
    # past the budget (7.5 = 1.25 x 6, bound 1.1 x 12): scaled down to the target
    measure, calls = policy(12.0)
    landing = land_on_target(measure, fake_measured(12.0), 6.0, 7.5, 1.5)
    assert landing.factor == pytest.approx(math.sqrt(0.5), abs=1e-4) and abs(landing.measured.kl / 6 - 1) <= LANDED
    # on the target already: nothing measured, the trained policy as it is
    measure, calls = policy(6.3)
    assert land_on_target(measure, fake_measured(6.3), 6.0, 7.5, 1.5).factor == 1.0 and calls == []
    # replies collapse past 1.1: no collapsed factor is shipped; each one after a collapse lies between the
    # largest that held and the smallest that collapsed: 1.2247, then 10% under it (1.1022), then, as 10% under
    # that would be under 1, which held, halfway between 1 and 1.1022
    measure, calls = policy(4.0, collapse_above=1.1)
    landing = land_on_target(measure, fake_measured(4.0), 6.0, 7.5, 1.5)
    assert calls[:3] == [1.2247, 1.1022, 1.0511] and len(calls) == 4
    assert all(1.0 < f < min(c for c in calls[:i] if c > 1.1) for i, f in enumerate(calls) if i)
    assert landing.factor == max(f for f in calls if f <= 1.1) and not landing.measured.signals["collapsed"]
    # max 1: only ever scaled down, so a policy under its target is shipped as trained
    measure, calls = policy(4.0)
    assert land_on_target(measure, fake_measured(4.0), 6.0, 7.5, 1.0).factor == 1.0 and calls == []
    # a collapsed trained policy is scaled down only; if every factor tried is unacceptable, factor 1 goes on
    # to the checkpoint fallbacks
    measure, calls = policy(4.0, collapse_above=0.0)
    landing = land_on_target(measure, fake_measured(4.0, collapsed=True), 6.0, 7.5, 1.5)
    assert calls and max(calls) < 1.0 and landing.factor == 1.0
    # a policy that never moved (KL 0) has no direction: nothing measured
    measure, calls = policy(0.0)
    assert land_on_target(measure, fake_measured(0.0), 6.0, 7.5, 1.5).factor == 1.0 and calls == []


def test_scaled_weights_scale_only_the_policy_adapters_b_matrices():
    from rlft.ppo.scale import scaled_weights

    weights = {"m.q_proj.lora_A.default.weight": torch.ones(2), "m.q_proj.lora_B.default.weight": torch.ones(2),
               "m.embed_tokens.lora_embedding_A.default": torch.ones(2),
               "m.embed_tokens.lora_embedding_B.default": torch.ones(2),
               "m.q_proj.lora_B.critic.weight": torch.ones(2), "v_head.weight": torch.ones(2)}
    scaled = scaled_weights(weights, "default", 1.5)
    assert {name for name, tensor in scaled.items() if tensor[0] == 1.5} == {
        "m.q_proj.lora_B.default.weight", "m.embed_tokens.lora_embedding_B.default"}
    assert all(scaled[name][0] == 1.0 for name in weights if "B.default" not in name)
