"""One PPO rollout as a typed record, and how it is collected: generate, score, forward passes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rlft.generation import SamplingConfig, decode_responses, encode_prompts, response_mask_from_eos, sample


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
    logprobs: torch.Tensor  # (B, T) policy log-probs of the sampled tokens, at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, T) reference log-probs of the same tokens
    values: torch.Tensor  # (B, T) critic values of the states before each token
    timings: dict = field(default_factory=dict)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)


@torch.no_grad()
def collect(actor_critic, tokenizer, prompts: list, prompt_texts: list[str], scorer,
            sampling: SamplingConfig, forward_batch_size: int, missing_eos_penalty: float,
            score_clip: float) -> Rollout:
    """Steps 1-3 of a PPO step: generate, score, and compute log-probs, reference log-probs and values.

    `actor_critic` is the unwrapped PolicyWithValueHead (under DDP; under FSDP2 it is the sharded model itself).
    """
    device = actor_critic.lm_head.weight.device
    timings = {}

    # 1. generate
    started = time.perf_counter()
    query = encode_prompts(tokenizer, prompt_texts, sampling.max_prompt_length, device)
    response_ids = sample(actor_critic, query, sampling, tokenizer)
    response_mask, ended = response_mask_from_eos(response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # Tokens after EOS are padding for every later pass, whatever generate() filled them with.
    response_ids = torch.where(response_mask, response_ids, tokenizer.pad_token_id)
    timings["time/generate"] = time.perf_counter() - started

    # 2. score
    started = time.perf_counter()
    completions = decode_responses(tokenizer, response_ids)
    scores = scorer(prompts, completions).to(device=device, dtype=torch.float32)
    scores = scores - missing_eos_penalty * (~ended).float()
    if score_clip > 0:
        scores = scores.clamp(-score_clip, score_clip)
    timings["time/score"] = time.perf_counter() - started

    # 3. policy log-probs, values and reference log-probs, in no-grad micro-batches
    started = time.perf_counter()
    input_ids = torch.cat([query["input_ids"], response_ids], dim=1)
    attention_mask = torch.cat([query["attention_mask"], response_mask.long()], dim=1)
    length = response_ids.shape[1]
    logprobs, values, ref_logprobs = [], [], []
    for start in range(0, len(prompts), forward_batch_size):
        rows = slice(start, start + forward_batch_size)
        lp, v, _ = actor_critic(input_ids[rows], attention_mask[rows], length, sampling.temperature)
        logprobs.append(lp)
        values.append(v)
        ref_logprobs.append(
            actor_critic.reference_logprobs(input_ids[rows], attention_mask[rows], length, sampling.temperature)
        )
    timings["time/forward"] = time.perf_counter() - started

    return Rollout(
        prompts=list(prompts),
        completions=completions,
        query_ids=query["input_ids"],
        query_mask=query["attention_mask"],
        response_ids=response_ids,
        response_mask=response_mask,
        ended_with_eos=ended,
        scores=scores,
        logprobs=torch.cat(logprobs),
        ref_logprobs=torch.cat(ref_logprobs),
        values=torch.cat(values),
        timings=timings,
    )
