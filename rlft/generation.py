"""Batched sampling from a causal LM: left-padded prompts, KV cache, responses cut (and masked) at EOS.

One implementation for every stage that generates: PPO rollouts, preference building, eval, SFT samples.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rlft.config import option, require
from rlft.errors import RlftError


@dataclass
class SamplingConfig:
    max_new_tokens: int = option(32, "Longest response in tokens.")
    temperature: float = option(1.0, "Sampling temperature; PPO recomputes log-probs at the same temperature.")
    top_p: float = option(1.0, "Nucleus sampling mass (1.0: off).")
    top_k: int = option(0, "Sample from the k most likely tokens (0: off).")
    min_new_tokens: int = option(0, "Forbid EOS for the first this many tokens (0: off). PPO's log-probs apply the "
                                 "same mask, so they still describe what was sampled.")
    max_prompt_length: int = option(256, "Prompts longer than this many tokens are an error, not silently cut.")

    def __post_init__(self):
        require(self.max_new_tokens > 0, "max_new_tokens", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0 (use a small value for near-greedy)")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.top_k >= 0, "top_k", "must be >= 0")
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "must be in [0, max_new_tokens]")
        require(self.max_prompt_length > 0, "max_prompt_length", "must be >= 1")


def encode_prompts(tokenizer, texts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    """Left-pad prompt texts (already chat-templated) so generated tokens line up at the right end."""
    if not texts:
        raise RlftError("no prompts to generate from: the prompt dataset is empty")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
    if len(encoded[longest]) > max_length:
        raise RlftError(
            f"a prompt is {len(encoded[longest])} tokens, longer than sampling.max_prompt_length={max_length} "
            f"({texts[longest][:60]!r}...): raise the limit or drop long prompts"
        )
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


@torch.no_grad()
def sample(model, prompt: dict[str, torch.Tensor], sampling: SamplingConfig, tokenizer, greedy: bool = False):
    """Response token ids (batch, <= max_new_tokens); after a row's first EOS the tokens are padding.

    Samples from softmax(logits / temperature) (with top_p / top_k when set) and nothing else: the
    sampling defaults a model ships in generation_config.json (repetition_penalty, no_repeat_ngram_size,
    min_length, bad_words_ids, its own top_k, ...) are set aside, so PPO's recomputed log-probs describe
    exactly what was sampled.
    """
    from transformers import GenerationConfig

    from rlft.distributed import is_sharded
    from rlft.models import context_length

    context, width = context_length(model), prompt["input_ids"].shape[1]
    if context and width + sampling.max_new_tokens > context:
        raise RlftError(
            f"a prompt of {width} tokens plus sampling.max_new_tokens={sampling.max_new_tokens} is longer than the "
            f"model's context ({context} tokens): lower sampling.max_prompt_length or max_new_tokens"
        )
    clean = GenerationConfig(
        do_sample=not greedy,
        temperature=sampling.temperature if not greedy else 1.0,
        top_p=sampling.top_p if not greedy else 1.0,
        top_k=sampling.top_k if not greedy else 0,
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.min_new_tokens or None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    with model_defaults_set_aside(model):
        # Sharded (FSDP2), each decoding step gathers every layer from all processes: all must take as many
        # steps as the longest one, however early their own rows end.
        output = model.generate(**prompt, generation_config=clean, synced_gpus=is_sharded(model))
    return output[:, prompt["input_ids"].shape[1] :]


@contextmanager
def model_defaults_set_aside(model):
    """generate() fills every option we leave unset from the model's own generation_config: swap in an
    empty one for the call."""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    shipped = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = shipped


def decode_responses(tokenizer, response_ids: torch.Tensor) -> list[str]:
    """Text of each response up to (not including) its first EOS."""
    texts = []
    for row in response_ids.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def complete(model, tokenizer, prompt_texts: list[str], sampling: SamplingConfig, batch_size: int = 16,
             greedy: bool = False, num_samples: int = 1) -> list[list[str]]:
    """`num_samples` completions for each templated prompt, in batches: [[completion, ...], ...]."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    results: list[list[str]] = [[] for _ in prompt_texts]
    starts = [start for _ in range(num_samples) for start in range(0, len(prompt_texts), batch_size)]
    for start in tqdm(starts, desc="generate", disable=len(starts) < 2):
        batch = prompt_texts[start : start + batch_size]
        prompt = encode_prompts(tokenizer, batch, sampling.max_prompt_length, model.device)
        texts = decode_responses(tokenizer, sample(model, prompt, sampling, tokenizer, greedy))
        for offset, text in enumerate(texts):
            results[start + offset].append(text)
    model.train(was_training)
    return results


def first_true_index(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim: (B, T) -> (B,) long; T for rows with none."""
    length = bools.shape[-1]
    positions = torch.arange(length, device=bools.device).expand_as(bools)
    return torch.where(bools, positions, length).min(-1).values


def response_mask_from_eos(
    response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the real response: every token up to AND INCLUDING the first EOS, none after.

    response_ids: (B, T) -> (response_mask (B, T) bool, ended_with_eos (B,) bool).
    Only the first EOS counts, whatever follows it, so pad == eos (as in SmolLM) is safe.
    A row with no EOS is all valid (truncated at the length limit), unless `pad_token_id`
    is given, differs from EOS, and appears: then the row ends just before its first pad.
    The EOS is kept so the policy is credited for choosing to stop.
    """
    length = response_ids.shape[-1]
    first_eos = first_true_index(response_ids == eos_token_id)
    ended_with_eos = first_eos < length
    end = first_eos + 1  # exclusive end, counting the EOS
    if pad_token_id is not None and pad_token_id != eos_token_id:
        first_pad = first_true_index(response_ids == pad_token_id)
        ended_with_eos &= first_eos < first_pad
        end = torch.minimum(end, first_pad)
    positions = torch.arange(length, device=response_ids.device)
    return positions < end.unsqueeze(-1), ended_with_eos
