"""One PPO rollout as a typed record, and how it is collected: 1. generate, 2. score, 3. forward passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from rlft.generation import SamplingConfig, completion_ids, sample
from rlft.ppo.core import entropy_from_logits, exact_kl_from_logits


@dataclass
class Rollout:
    """A batch of B prompts and their sampled responses. Shapes: P prompt length, T response length."""

    prompts: list  # raw prompts (strings or message lists), as the scorers take them
    columns: dict[str, list]  # the data's other columns, a value per row (a function scorer's keyword arguments)
    completions: list[str]  # decoded responses, up to EOS
    query_ids: torch.Tensor  # (B, P) left-padded
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) bool: tokens up to and including the first EOS
    ended_with_eos: torch.Tensor  # (B,) bool
    sampler_logprobs: torch.Tensor  # (B, T) the sampling loop's own log-probs of its tokens (0 at padding)
    temperature: float  # the sampling temperature: every log-prob here is at it
    scores: torch.Tensor | None = None  # (B,) step 2: scorer output (after the missing-EOS penalty and clipping)
    # step 3 (forward_passes) fills these
    logprobs: torch.Tensor | None = None  # (B, T) policy log-probs of the sampled tokens
    ref_logprobs: torch.Tensor | None = None  # (B, T) reference log-probs of the same tokens
    values: torch.Tensor | None = None  # (B, T) critic values of the states before each token
    exact_kl: torch.Tensor | None = None  # (B, T) KL(pi || pi_ref) over the whole vocabulary at each position
    ref_entropy: torch.Tensor | None = None  # (B, T) the reference's entropy at each position (0 at padding)
    # step 5 (rlft.ppo.train.estimate_advantages) fills these
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T) the critic's targets (gae only)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)


class FirstMiniBatch(NamedTuple):
    """The update's first epoch order, and step 3's live forward of its first micro-batch when that is one whole
    mini-batch: the update backpropagates through it instead of running that forward again."""

    order: torch.Tensor  # (B,) the first epoch's row order
    output: tuple | None  # (logprobs, values, logits) of order[:mini_batch_size] with autograd on; or None


def generate(actor_critic, tokenizer, prompts: list, prompt_texts: list[str], sampling: SamplingConfig,
             columns: dict[str, list] | None = None) -> Rollout:
    """Step 1: a response to each prompt, sampled from the policy (`actor_critic` unwrapped: under DDP the
    PolicyWithValueHead, under FSDP2 the sharded model itself)."""
    responses, = sample(actor_critic, tokenizer, prompt_texts, sampling)
    return Rollout(prompts=list(prompts), columns=columns or {}, completions=responses.texts,
                   query_ids=responses.query["input_ids"], query_mask=responses.query["attention_mask"], response_ids=responses.ids,
                   response_mask=responses.mask, ended_with_eos=responses.ended_with_eos,
                   sampler_logprobs=responses.logprobs, temperature=sampling.temperature)


@torch.no_grad()
def score(rollout: Rollout, scorer, missing_eos_penalty: float, score_clip: float) -> None:
    """Step 2: the scorer's score of each response, less `missing_eos_penalty` where it was cut at the length
    limit, clipped to [-score_clip, score_clip] when score_clip > 0, into rollout.scores (B,)."""
    scores = scorer(rollout.prompts, rollout.completions, **rollout.columns,
                    completion_ids=completion_ids(rollout.response_ids, rollout.response_mask))
    scores = scores.to(device=rollout.response_ids.device, dtype=torch.float32)
    scores = scores - missing_eos_penalty * (~rollout.ended_with_eos).float()
    rollout.scores = scores.clamp(-score_clip, score_clip) if score_clip > 0 else scores


def forward_passes(actor_critic, rollout: Rollout, forward_batch_size: int, graph_model=None,
                   graph_rows: torch.Tensor | None = None):
    """Step 3: the policy's log-probs and values, the reference's log-probs and entropy, and the exact per-token KL
    between the two (from the same logits, over the whole vocabulary) of every row, into `rollout`.

    No-grad micro-batches of `forward_batch_size` rows, each through the policy and then the reference, except
    `graph_rows`: those go through `graph_model` (the prepared model the update calls) with autograd on, and
    their live (logprobs, values, logits) are returned for the update's first micro-batch to backpropagate
    through. That is the same forward on the same weights the update would run before its first optimiser step,
    so it runs once, and the ratio of those rows is 1 by construction. Returns None without graph_rows.
    """
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    length, temperature = rollout.response_ids.shape[1], rollout.temperature
    batch = len(input_ids)
    logprobs = torch.zeros(rollout.response_ids.shape, device=input_ids.device)
    values, ref_logprobs, exact_kl = torch.zeros_like(logprobs), torch.zeros_like(logprobs), torch.zeros_like(logprobs)
    ref_entropy = torch.zeros_like(logprobs)
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
            ref_entropy[rows] = entropy_from_logits(ref_logits, temperature)
        if graph_rows is not None:
            ref_logprobs[graph_rows], graph_ref_logits = actor_critic.reference_logprobs(
                input_ids[graph_rows], attention_mask[graph_rows], length, temperature)
            ref_entropy[graph_rows] = entropy_from_logits(graph_ref_logits, temperature)
    live = None
    if graph_rows is not None:  # last, so its graph is not held while the no-grad passes allocate theirs
        with torch.enable_grad():
            live = graph_model(input_ids[graph_rows], attention_mask[graph_rows], length, temperature)
        logprobs[graph_rows], values[graph_rows] = live[0].detach(), live[1].detach()
        exact_kl[graph_rows] = exact_kl_from_logits(live[2].detach(), graph_ref_logits, temperature)
    mask = rollout.response_mask
    rollout.logprobs, rollout.values, rollout.ref_logprobs = logprobs, values, ref_logprobs
    rollout.exact_kl, rollout.ref_entropy = torch.where(mask, exact_kl, 0), torch.where(mask, ref_entropy, 0)
    return live
