"""Policy, reference and critic over ONE copy of the base weights.

- policy: the base with the PPO LoRA adapter on;
- reference: the same modules with every adapter off (the SFT adapter, if any, was merged into the
  base before the PPO adapter was added, so the reference is the SFT model);
- critic `head`: a linear head on the policy's last hidden state (shared trunk). One forward pass yields
  log-probs and values, so a rollout costs one policy pass plus one reference pass. The head reads
  the hidden state through a stop-gradient: with a shared trunk, large value errors (early on, or
  under a large KL coefficient) otherwise dominate the clipped gradient and drag the policy away
  from its reference (measured: with beta=50 the KL grew to 5 nats instead of staying near 0).
- critic `adapter`: its own LoRA adapter ("critic") on the same base and a value head on that trunk, in its
  own parameter group; started from the reward adapter when PPO scores with one (InstructGPT; Huang et al.
  2024, "The N+ implementation details of RLHF with PPO"). Values cost one more forward pass.
- a reward model may be a fourth adapter ("reward_<scorer name>", reward_models.scorers.AdapterScorer).
Adapters are switched with `active_adapter`, which leaves requires_grad alone.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn

from rlft import generation
from rlft.distributed import gathered, is_sharded
from rlft.generation import position_ids_for
from rlft.models import half_compute
from rlft.policy import active_adapter
from rlft.ppo.core import logprobs_from_logits

CRITIC = "critic"  # the critic adapter's name; the policy's is peft's "default"


def without_shared_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Drop the leading columns that are padding in every row: a micro-batch's prompts are left-padded to the
    whole rollout's longest. Masked keys add nothing to attention and positions skip padding, so every kept
    position computes the same function on fewer columns. -> (input_ids, attention_mask), (B, L' <= L)."""
    first = int(attention_mask.any(0).long().argmax())  # the first column some row uses
    return input_ids[:, first:], attention_mask[:, first:]


class PolicyWithValueHead(nn.Module):
    def __init__(self, policy, critic: str | None = "head", eos_token_id: int | None = None, min_new_tokens: int = 0,
                 critic_from=None, gather_for_generation: bool = False):
        """critic: "head", "adapter" or None (critic-free estimators: grpo, rloo, reinforce_pp train none).
        critic_from: an attached AdapterScorer whose adapter and head start the adapter critic.
        gather_for_generation: under FSDP, generate on the whole gathered policy (rlft.distributed.gathered)."""
        super().__init__()
        self.gather_for_generation = gather_for_generation
        self.policy = policy  # a peft PeftModel; its base weights are frozen
        self.critic = critic
        # The sampler's EOS ban on the first min_new_tokens tokens, applied to every log-prob too
        self.eos_token_id, self.min_new_tokens = eos_token_id, min_new_tokens
        self.lm_head = policy.get_base_model().get_output_embeddings()
        self.value_head = None
        if critic:
            # The head reads what the LM head reads: its input width, not config.hidden_size (OPT-350m
            # projects to word_embed_proj_dim first; multimodal wrapper configs have no hidden_size at all).
            self.value_head = nn.Linear(self.lm_head.weight.shape[1], 1)
            # A zero head starts every value at 0: no random critic noise in the first advantages.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(next(policy.parameters()).device)
        if critic == "adapter":
            if critic_from is not None:  # the reward model's adapter, and its head rescaled to normalised scores
                policy.load_adapter(critic_from.path, adapter_name=CRITIC, is_trainable=True)
                weight, bias = critic_from.value_head_init()
                with torch.no_grad():
                    self.value_head.weight.copy_(weight)
                    self.value_head.bias.copy_(bias)
            else:  # the policy's adapter config, at its identity init: the critic starts as the base's trunk
                policy.add_adapter(CRITIC, copy.deepcopy(policy.peft_config[policy.active_adapter]))
            policy.train(policy.training)  # the new adapter's dropout modules start in training mode
            for name, parameter in policy.named_parameters():  # peft's add/load freeze all but the active adapter
                if f".{CRITIC}." in name or f".{policy.active_adapter}." in name:
                    parameter.requires_grad_(True)

    # What accelerate's FSDP2 preparation reads from the model it shards: the layers that become units,
    # and the embeddings that get their own.
    @property
    def _no_split_modules(self):
        return self.policy.get_base_model()._no_split_modules

    @property
    def config(self):
        return self.policy.config

    def get_base_model(self):
        return self.policy.get_base_model()

    def get_input_embeddings(self):
        return self.policy.get_base_model().get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm_head

    def sampling_loop(self, prompt, sampling, eos_token_id: int, pad_token_id: int, greedy: bool = False):
        """The policy's sampling loop (rlft.generation.sampling_loop): a method of the root module, so FSDP2 can
        gather around it (train.py)."""
        with gathered(self) if self.gather_for_generation else nullcontext():
            return generation.sampling_loop(self.policy, prompt, sampling, eos_token_id, pad_token_id, greedy,
                                            synced=is_sharded(self))

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """Trainable parameters by optimiser group: [policy adapter (+ the head critic)], [critic adapter + head]."""
        critic = [p for n, p in self.policy.named_parameters() if p.requires_grad and f".{CRITIC}." in n]
        policy = [p for n, p in self.policy.named_parameters() if p.requires_grad and f".{CRITIC}." not in n]
        head = [] if self.value_head is None else list(self.value_head.parameters())
        return [policy + head] if self.critic != "adapter" else [policy, critic + head]

    def forward(self, input_ids, attention_mask, response_length: int, temperature: float):
        """Log-probs of the response tokens, the values of the states before them, and their logits.

        input_ids, attention_mask: (B, P + T), prompt left-padded then response; T = response_length.
        Returns logprobs (B, T) float32, values (B, T) float32 (zeros without a critic), logits (B, T, V).
        """
        input_ids, attention_mask = without_shared_padding(input_ids, attention_mask)
        # The head's input is the last hidden state at exactly the kept positions; a pre-hook reads it
        # for any architecture, where output_hidden_states would keep every layer's activations alive.
        captured = {}
        hook = self.lm_head.register_forward_pre_hook(lambda module, args: captured.update(hidden=args[0]))
        try:
            with half_compute(self.policy):
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
        if self.critic == "adapter":
            hidden = self.critic_hidden(input_ids, attention_mask, response_length)
        else:  # detached: critic errors must not push the policy's adapter around (see module docstring)
            hidden = captured["hidden"][:, :-1].detach()
        # float32, outside autocast: values feed GAE, and bf16 keeps 3 significant digits
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logprobs, values, logits

    def critic_hidden(self, input_ids, attention_mask, response_length: int) -> torch.Tensor:
        """(B, T, H) last hidden states of the states before each response token, under the critic adapter:
        the trunk alone (HF's `base_model`, what sequence classifiers read), no LM head."""
        trunk = self.policy.get_base_model().base_model
        with active_adapter(self.policy, CRITIC), half_compute(self.policy):
            hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_for(attention_mask), use_cache=False).last_hidden_state
        return hidden[:, -response_length - 1 : -1]

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, response_length: int, temperature: float):
        """(log-probs (B, T) float32, logits (B, T, V)) of the response under the reference: the same weights with
        the PPO adapter switched off."""
        input_ids, attention_mask = without_shared_padding(input_ids, attention_mask)
        with active_adapter(self.policy, None), half_compute(self.policy):
            output = self.policy(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_for(attention_mask),
                logits_to_keep=response_length + 1,
                use_cache=False,
            )
        logits = self.as_sampled(output.logits[:, :-1])
        return logprobs_from_logits(logits, input_ids[:, -response_length:], temperature), logits

    def as_sampled(self, logits: torch.Tensor) -> torch.Tensor:
        """Response logits (B, T, V) with EOS at -inf where the sampler banned it (the first min_new_tokens)."""
        positions = torch.arange(logits.shape[1], device=logits.device)
        return generation.ban_early_eos(logits, positions, self.eos_token_id, self.min_new_tokens)
