"""One PPO update of a fixed rollout, split over however many processes `accelerate launch` starts.

    accelerate launch --config_file C --num_processes N tests/ddp_update.py MODEL_DIR OUT.pt '{"advantage_estimator": ...}'

Every process builds the same model and the same 8-row rollout (same seeds), computes advantages on all
of it (groups whole), keeps its own contiguous share of the rows, and takes one optimiser step; the main
process saves the adapter. N = 1 and N = 2 must save the same weights, under DDP or FSDP2 (C: ddp_cpu.yaml,
fsdp.yaml).
"""

import dataclasses
import json
import sys

import torch

from rlft import distributed
from rlft.config import ModelConfig
from rlft.generation import SamplingConfig
from rlft.models import load_tokenizer
from rlft.ppo.config import PPOConfig, PPOHyperparameters, PPOLoraConfig
from rlft.ppo.model import PolicyWithValueHead
from rlft.ppo.rollout import Rollout, forward_passes, generate, score
from rlft.ppo.train import build_actor_critic, estimate_advantages, ppo_update

WORDS = "hello how are you tell me about the cat dog sun rain".split()


def moved_policy(config: ModelConfig, hp: PPOHyperparameters) -> PolicyWithValueHead:
    """The tiny policy as `rlft ppo` builds it, with its LoRA B set off zero (seeded), so the adapter already
    differs from the reference."""
    torch.manual_seed(0)
    ppo = PPOConfig(sft_adapter="", model=config, lora=PPOLoraConfig(r=4, alpha=32), ppo=hp)
    model = build_actor_critic(ppo, load_tokenizer(config), lambda prompts, completions, **_: None, "cpu")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return model


def collect_rollout(actor_critic, tokenizer, prompts: list, texts: list[str], scorer, sampling: SamplingConfig,
                    forward_batch_size: int) -> Rollout:
    """Steps 1-3 of a PPO step, as rlft.ppo.train.ppo_step runs them (no missing-EOS penalty, no clip)."""
    rollout = generate(actor_critic, tokenizer, prompts, texts, sampling)
    score(rollout, scorer, 0.0, 0.0)
    forward_passes(actor_critic, rollout, forward_batch_size)
    return rollout


def main(model_dir: str, out: str, estimator: dict) -> None:
    accelerator = distributed.accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    config = ModelConfig(name_or_path=model_dir)
    tokenizer = load_tokenizer(config)
    hp = PPOHyperparameters(rollout_batch_size=8 // world, mini_batch_size=8 // world, ppo_epochs=1,
                            learning_rate=1e-2, **estimator)
    model = moved_policy(config, hp)
    k = hp.num_generations
    prompts = [w for w in WORDS[: 8 // k] for _ in range(k)]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    torch.manual_seed(1)
    rollout = collect_rollout(model, tokenizer, prompts, texts, lambda p, c, **_: torch.linspace(-1, 1, len(c)),
                              SamplingConfig(max_new_tokens=6), 8)
    for row in range(8):  # responses of 6, 5, 4 and 3 tokens: the two halves hold different token counts
        rollout.response_mask[row, 6 - row % 4 - (row >= 4):] = False
    rollout.response_ids.masked_fill_(~rollout.response_mask, tokenizer.pad_token_id)
    rewards = torch.where(rollout.response_mask, -0.1 * (rollout.logprobs - rollout.ref_logprobs), 0)
    rewards[:, -1] += rollout.scores
    rollout.advantages, rollout.returns = estimate_advantages(
        rewards, rollout, dataclasses.replace(hp, rollout_batch_size=8, mini_batch_size=8))
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    mine = Rollout(**{f.name: (value[rows] if isinstance(value := getattr(rollout, f.name), (list, torch.Tensor))
                               else value) for f in dataclasses.fields(Rollout)})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    assert distributed.is_sharded(wrapped) == (accelerator.distributed_type == "FSDP")  # the launcher's choice held
    ppo_update(wrapped, accelerator, optimizer, mine, hp, kl_coef=0.5)
    trained = {n: distributed.full_tensor(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if accelerator.is_main_process:
        torch.save(trained, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    distributed.end_process_group(finished=True)  # as `rlft` does: gloo left to teardown can abort the exit
