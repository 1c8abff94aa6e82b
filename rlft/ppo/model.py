"""Policy, reference and critic over ONE copy of the base weights.

- policy: the base with the PPO LoRA adapter on;
- reference: the same modules under `disable_adapter()` (the SFT adapter, if any, was merged into the
  base before the PPO adapter was added, so the reference is the SFT model);
- critic: a linear head on the policy's last hidden state (shared trunk). One forward pass yields
  log-probs and values, so a rollout costs one policy pass plus one reference pass. The head reads
  the hidden state through a stop-gradient: with a shared trunk, large value errors (early on, or
  under a large KL coefficient) otherwise dominate the clipped gradient and drag the policy away
  from its reference (measured: with beta=50 the KL grew to 5 nats instead of staying near 0).
"""

from __future__ import annotations

import torch
from torch import nn

from rlft.ppo.core import logprobs_from_logits


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` assigns them, so recomputed log-probs match."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyWithValueHead(nn.Module):
    def __init__(self, policy, critic: bool = True, eos_token_id: int | None = None, min_new_tokens: int = 0):
        super().__init__()
        self.policy = policy  # a peft PeftModel; its base weights are frozen
        # The sampler's EOS ban on the first min_new_tokens tokens, applied to every log-prob too
        self.eos_token_id, self.min_new_tokens = eos_token_id, min_new_tokens
        self.lm_head = policy.get_base_model().get_output_embeddings()
        self.value_head = None  # critic-free estimators (grpo, rloo, reinforce_pp) train none
        if critic:
            # The head reads what the LM head reads: its input width, not config.hidden_size (OPT-350m
            # projects to word_embed_proj_dim first; multimodal wrapper configs have no hidden_size at all).
            self.value_head = nn.Linear(self.lm_head.weight.shape[1], 1)
            # A zero head starts every value at 0: no random critic noise in the first advantages.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(next(policy.parameters()).device)

    def forward(self, input_ids, attention_mask, response_length: int, temperature: float):
        """Log-probs of the response tokens, the values of the states before them, and their logits.

        input_ids, attention_mask: (B, P + T), prompt left-padded then response; T = response_length.
        Returns logprobs (B, T) float32, values (B, T) float32 (zeros without a critic), logits (B, T, V).
        """
        # The head's input is the last hidden state at exactly the kept positions; a pre-hook reads it
        # for any architecture, where output_hidden_states would keep every layer's activations alive.
        captured = {}
        hook = self.lm_head.register_forward_pre_hook(lambda module, args: captured.update(hidden=args[0]))
        try:
            output = self.policy(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_for(attention_mask),
                logits_to_keep=response_length + 1,  # only the response's logits: the vocab is the big axis
                use_cache=False,
            )
        finally:
            hook.remove()
        logits = self.as_sampled(output.logits[:, :-1])  # position P-1+t predicts response token t
        logprobs = logprobs_from_logits(logits, input_ids[:, -response_length:], temperature)
        if self.value_head is None:
            return logprobs, torch.zeros_like(logprobs), logits
        # Detached: critic errors must not push the policy's adapter around (see module docstring).
        hidden = captured["hidden"][:, :-1].detach()
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logprobs, values, logits

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, response_length: int, temperature: float):
        """Log-probs under the reference: the same weights with the PPO adapter switched off."""
        with self.policy.disable_adapter():
            output = self.policy(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_for(attention_mask),
                logits_to_keep=response_length + 1,
                use_cache=False,
            )
        return logprobs_from_logits(self.as_sampled(output.logits[:, :-1]), input_ids[:, -response_length:],
                                    temperature)

    def as_sampled(self, logits: torch.Tensor) -> torch.Tensor:
        """Response logits (B, T, V) with EOS at -inf where the sampler banned it (the first min_new_tokens)."""
        if not self.min_new_tokens:
            return logits
        banned = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)
        banned[: self.min_new_tokens, self.eos_token_id] = True
        return logits.masked_fill(banned, float("-inf"))
