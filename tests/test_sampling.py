"""On-policy sampling: the log-probs PPO recomputes are those of the distribution that was sampled, even
for a model whose generation_config.json ships sampling defaults."""

import shutil

import pytest
import torch

from rlft.config import LoraConfig, ModelConfig, load_config
from rlft.errors import RlftError
from rlft.generation import SamplingConfig, encode_prompts, response_mask_from_eos, sample
from rlft.models import add_lora, load_model, load_tokenizer
from rlft.ppo.config import PPOConfig
from rlft.ppo.model import PolicyWithValueHead


@pytest.fixture
def opinionated_model(tiny_lm_dir, tmp_path):
    """The tiny Llama with Qwen2.5-Instruct-like defaults (and stronger ones) in its generation config."""
    from transformers import GenerationConfig

    folder = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, folder)
    GenerationConfig(do_sample=True, repetition_penalty=1.3, top_k=20, top_p=0.8, temperature=0.7,
                     no_repeat_ngram_size=2, min_new_tokens=3).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("min_new_tokens", [0, 5])
def test_sampler_log_probs_equal_the_recomputed_ones(opinionated_model, min_new_tokens):
    config = ModelConfig(name_or_path=str(opinionated_model))
    tokenizer = load_tokenizer(config)
    torch.manual_seed(0)
    policy = PolicyWithValueHead(add_lora(load_model(config), config, LoraConfig(r=4, dropout=0.0)),
                                 eos_token_id=tokenizer.eos_token_id, min_new_tokens=min_new_tokens).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) for text in ("hello how are", "tell me a", "the cat")]
    query = encode_prompts(tokenizer, prompts, 64, "cpu")
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.3, min_new_tokens=min_new_tokens)

    captured = {}
    generate = policy.policy.generate

    def generate_and_keep_scores(**kwargs):  # the sampler's own next-token distributions, as it sampled
        output = generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        captured["scores"] = torch.stack(output.scores, dim=1)  # (B, T, V), after every logits processor
        return output.sequences

    policy.policy.generate = generate_and_keep_scores
    response = sample(policy.policy, query, sampling, tokenizer)
    mask, _ = response_mask_from_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)
    sampler_logprobs = captured["scores"].log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)

    input_ids = torch.cat([query["input_ids"], response], 1)
    attention_mask = torch.cat([query["attention_mask"], mask.long()], 1)
    with torch.no_grad():
        recomputed, _, _ = policy(input_ids, attention_mask, response.shape[1], sampling.temperature)
    # top_k=20 in the model's config would make the sampler's scores -inf outside the top 20; penalties
    # would shift them: with the defaults set aside both are softmax(logits / T), to float rounding.
    torch.testing.assert_close(sampler_logprobs[mask], recomputed[mask], atol=1e-5, rtol=1e-5)
    assert policy.policy.get_base_model().generation_config.repetition_penalty == 1.3  # restored after sampling


def test_ppo_refuses_truncated_sampling():
    for override in ("sampling.top_p=0.9", "sampling.top_k=20"):
        with pytest.raises(RlftError, match="top_p < 1 or top_k > 0 would sample from another distribution"):
            load_config(PPOConfig, None, [override])


def test_prompts_past_the_context_are_refused(tiny_lm_dir):
    config = ModelConfig(name_or_path=str(tiny_lm_dir))  # max_position_embeddings=256
    tokenizer, model = load_tokenizer(config), load_model(config)
    query = encode_prompts(tokenizer, ["hello " * 250], 300, "cpu")
    with pytest.raises(RlftError, match=r"a prompt of 250 tokens plus sampling.max_new_tokens=8 is longer than the "
                                        r"model's context \(256 tokens\)"):
        sample(model, query, SamplingConfig(max_new_tokens=8), tokenizer)
