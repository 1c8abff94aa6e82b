"""One PPO rollout as a typed record, and how it is collected: generate, score, forward passes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rlft.generation import SamplingConfig, decode_responses, encode_prompts, response_mask_from_eos, sample
from rlft.ppo.core import exact_kl_from_logits


@dataclass
class Rollout:
    """A batch of B prompts and their sampled responses. Shapes: P prompt length, T response length."""

    prompts: list  # raw prompts (strings or message lists), as the scorers take them
    completions: list[str]  # decoded responses, up to EOS
    query_ids: torch.Tensor  # (B, P) left-padded
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) bool: tokens up to and including the first EOS
    ended_with_eos: torch.Tensor  # (B,) bool
    scores: torch.Tensor  # (B,) scorer output (after the missing-EOS penalty and clipping)
    sampler_logprobs: torch.Tensor  # (B, T) the sampling loop's own log-probs of its tokens (0 at padding)
    # step 3 (forward_passes) fills these
    logprobs: torch.Tensor | None = None  # (B, T) policy log-probs of the sampled tokens, at the sampling temperature
    ref_logprobs: torch.Tensor | None = None  # (B, T) reference log-probs of the same tokens
    values: torch.Tensor | None = None  # (B, T) critic values of the states before each token
    exact_kl: torch.Tensor | None = None  # (B, T) KL(pi || pi_ref) over the whole vocabulary at each position
    timings: dict = field(default_factory=dict)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)


def collect(actor_critic, tokenizer, prompts: list, prompt_texts: list[str], scorer,
            sampling: SamplingConfig, forward_batch_size: int, missing_eos_penalty: float,
            score_clip: float) -> Rollout:
    """Steps 1-3 of a PPO step: generate, score, and compute log-probs, reference log-probs and values.

    `actor_critic` is the unwrapped PolicyWithValueHead (under DDP; under FSDP2 it is the sharded model itself).
    """
    rollout = generate_and_score(actor_critic, tokenizer, prompts, prompt_texts, scorer, sampling,
                                 missing_eos_penalty, score_clip)
    forward_passes(actor_critic, rollout, forward_batch_size, sampling.temperature)
    return rollout


@torch.no_grad()
def generate_and_score(actor_critic, tokenizer, prompts: list, prompt_texts: list[str], scorer,
                       sampling: SamplingConfig, missing_eos_penalty: float, score_clip: float) -> Rollout:
    """Steps 1-2: sample a response to each prompt and score it. The log-probs and values are step 3's."""
    device = actor_critic.lm_head.weight.device
    timings = {}

    # 1. generate
    started = time.perf_counter()
    query = encode_prompts(tokenizer, prompt_texts, sampling.max_prompt_length, device)
    sampled = sample(actor_critic, query, sampling, tokenizer)
    response_mask, ended = response_mask_from_eos(sampled.ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # Tokens after EOS are padding for every later pass, whatever the sampler filled them with.
    response_ids = torch.where(response_mask, sampled.ids, tokenizer.pad_token_id)
    timings["time/generate"] = time.perf_counter() - started

    # 2. score
    started = time.perf_counter()
    completions = decode_responses(tokenizer, response_ids)
    scores = scorer(prompts, completions).to(device=device, dtype=torch.float32)
    scores = scores - missing_eos_penalty * (~ended).float()
    if score_clip > 0:
        scores = scores.clamp(-score_clip, score_clip)
    timings["time/score"] = time.perf_counter() - started

    return Rollout(prompts=list(prompts), completions=completions, query_ids=query["input_ids"],
                   query_mask=query["attention_mask"], response_ids=response_ids, response_mask=response_mask,
                   ended_with_eos=ended, scores=scores, sampler_logprobs=torch.where(response_mask, sampled.logprobs, 0),
                   timings=timings)


def forward_passes(actor_critic, rollout: Rollout, forward_batch_size: int, temperature: float,
                   graph_model=None, graph_rows: torch.Tensor | None = None):
    """Step 3: the policy's log-probs and values, the reference's log-probs, and the exact per-token KL between
    the two (from the same logits, over the whole vocabulary) of every row, into `rollout`.

    No-grad micro-batches of `forward_batch_size` rows, each through the policy and then the reference, except
    `graph_rows`: those go through `graph_model` (the prepared model the update calls) with autograd on, and
    their live (logprobs, values, logits) are returned for the update's first micro-batch to backpropagate
    through. That is the same forward on the same weights the update would run before its first optimiser step,
    so it runs once, and the ratio of those rows is 1 by construction. Returns None without graph_rows.
    """
    started = time.perf_counter()
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    length = rollout.response_ids.shape[1]
    batch = len(input_ids)
    logprobs = torch.zeros(rollout.response_ids.shape, device=input_ids.device)
    values, ref_logprobs, exact_kl = torch.zeros_like(logprobs), torch.zeros_like(logprobs), torch.zeros_like(logprobs)
    rest = torch.arange(batch, device=input_ids.device)
    if graph_rows is not None:
        rest = rest[~torch.isin(rest, graph_rows.to(rest.device))]
    with torch.no_grad():
        for start in range(0, len(rest), forward_batch_size):
            rows = rest[start : start + forward_batch_size]
            logprobs[rows], values[rows], logits = actor_critic(input_ids[rows], attention_mask[rows], length,
                                                                temperature)
            ref_logprobs[rows], ref_logits = actor_critic.reference_logprobs(input_ids[rows], attention_mask[rows],
                                                                             length, temperature)
            exact_kl[rows] = exact_kl_from_logits(logits, ref_logits, temperature)
        if graph_rows is not None:
            ref_logprobs[graph_rows], graph_ref_logits = actor_critic.reference_logprobs(
                input_ids[graph_rows], attention_mask[graph_rows], length, temperature)
    live = None
    if graph_rows is not None:  # last, so its graph is not held while the no-grad passes allocate theirs
        with torch.enable_grad():
            live = graph_model(input_ids[graph_rows], attention_mask[graph_rows], length, temperature)
        logprobs[graph_rows], values[graph_rows] = live[0].detach(), live[1].detach()
        exact_kl[graph_rows] = exact_kl_from_logits(live[2].detach(), graph_ref_logits, temperature)
    mask = rollout.response_mask
    rollout.logprobs, rollout.values, rollout.ref_logprobs = logprobs, values, ref_logprobs
    rollout.exact_kl = torch.where(mask, exact_kl, 0)
    rollout.timings["time/forward"] = time.perf_counter() - started
    return live
