"""On-policy sampling: the log-probs PPO recomputes are those of the distribution that was sampled, even
for a model whose generation_config.json ships sampling defaults."""

import shutil

import pytest
import torch

from rlft.config import LoraConfig, ModelConfig, load_config
from rlft.errors import RlftError
from rlft.generation import (
    SamplingConfig,
    encode_prompts,
    next_tokens,
    packed_linears,
    packing_supported,
    position_ids_for,
    response_mask_from_eos,
    sample,
    sampling_loop,
)
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


def randomised_policy(model_dir, min_new_tokens: int = 0):
    """A PolicyWithValueHead on the model with a LoRA adapter whose B is random: policy != reference, and the
    merged weights differ from the unmerged adapter's path by float rounding."""
    config = ModelConfig(name_or_path=str(model_dir))
    tokenizer = load_tokenizer(config)
    torch.manual_seed(0)
    policy = PolicyWithValueHead(add_lora(load_model(config), config, LoraConfig(r=4, dropout=0.0)),
                                 eos_token_id=tokenizer.eos_token_id, min_new_tokens=min_new_tokens).eval()
    with torch.no_grad():
        for name, parameter in policy.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    return policy, tokenizer, encode_prompts(tokenizer, templated(tokenizer), 64, "cpu")


def templated(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            for text in ("hello how are", "tell me a", "the cat")]


@pytest.mark.parametrize("min_new_tokens", [0, 5])
@pytest.mark.parametrize("merge_adapter", [True, False])
def test_sampler_log_probs_equal_the_recomputed_ones(opinionated_model, min_new_tokens, merge_adapter):
    policy, tokenizer, query = randomised_policy(opinionated_model, min_new_tokens)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.3, min_new_tokens=min_new_tokens,
                              merge_adapter=merge_adapter)
    # the sampler's own log-probs of what it drew, as it drew them
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    response, sampler_logprobs = sampling_loop(policy.policy, query, sampling, eos, pad)
    mask, _ = response_mask_from_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)

    input_ids = torch.cat([query["input_ids"], response], 1)
    attention_mask = torch.cat([query["attention_mask"], mask.long()], 1)
    with torch.no_grad():
        recomputed, _, _ = policy(input_ids, attention_mask, response.shape[1], sampling.temperature)
    # top_k=20 in the model's config would make the sampler's scores -inf outside the top 20; penalties would
    # shift them: the loop never reads them, so both are softmax(logits / T), to float rounding (of the
    # merged weights, too, when merged).
    torch.testing.assert_close(sampler_logprobs[mask], recomputed[mask], atol=1e-5, rtol=1e-5)
    if min_new_tokens:
        assert (response[:, :min_new_tokens] != tokenizer.eos_token_id).all()


def test_merged_sampling_leaves_every_weight_exact_and_the_adapter_on(tiny_lm_dir):
    policy, tokenizer, query = randomised_policy(tiny_lm_dir)
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    sample(policy, tokenizer, templated(tokenizer), SamplingConfig(max_new_tokens=6))
    after = policy.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit for bit, base and adapter
    # the adapter is switched on again: the policy still differs from its reference
    input_ids = torch.cat([query["input_ids"], query["input_ids"]], 1)
    mask = torch.cat([query["attention_mask"], query["attention_mask"]], 1)
    with torch.no_grad():
        logprobs, _, _ = policy(input_ids, mask, query["input_ids"].shape[1], 1.0)
        ref_logprobs, _ = policy.reference_logprobs(input_ids, mask, query["input_ids"].shape[1], 1.0)
    assert (logprobs - ref_logprobs).abs().max() > 1e-3


@pytest.mark.skipif(not packing_supported(), reason="no oneDNN bf16 kernels on this CPU: nothing is packed")
@pytest.mark.parametrize("merge_adapter", [True, False])
def test_prepacked_weights_sample_the_same_tokens_and_log_probs(tiny_lm_dir, merge_adapter, monkeypatch):
    """Decoding from oneDNN-prepacked bf16 weights is a speed-up, not an approximation: the same tokens and
    sampler log-probs bit for bit as F.linear on the plain weights, and the layers are plain again afterwards."""
    import rlft.generation as generation

    config = ModelConfig(name_or_path=str(tiny_lm_dir), dtype="bfloat16")
    tokenizer = load_tokenizer(config)
    torch.manual_seed(0)
    model = add_lora(load_model(config), config, LoraConfig(r=4, dropout=0.0)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    query = encode_prompts(tokenizer, templated(tokenizer), 64, "cpu")
    packs, calls = [], []  # which weights were packed (the layer's own, or a merged copy); packed matmuls run
    pack_linear, packed_linear = generation.pack_linear, generation.packed_linear
    monkeypatch.setattr(generation, "pack_linear", lambda layer, weight: (
        packs.append(weight is layer.weight), pack_linear(layer, weight)))
    monkeypatch.setattr(generation, "packed_linear", lambda *args: (calls.append(1), packed_linear(*args))[1])
    draws = []
    for pack in (True, False):
        torch.manual_seed(1)
        sampling = SamplingConfig(max_new_tokens=12, temperature=1.3, merge_adapter=merge_adapter, pack_weights=pack)
        draws.append(sampling_loop(model, query, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id))
        if pack:  # every bf16 linear layer packed (the adapted ones from their merged weights when merging), used
            linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16]
            assert len(packs) == len(linears) and len(calls) >= len(linears)
            assert packs.count(False) == (len(linears) - 1 if merge_adapter else 0)  # all but the untouched head
            packs.clear(), calls.clear()
    assert not packs and not calls  # pack_weights=False packs nothing
    (packed_ids, packed_logprobs), (plain_ids, plain_logprobs) = draws
    assert torch.equal(packed_ids, plain_ids) and torch.equal(packed_logprobs, plain_logprobs)
    assert len(set(plain_ids.flatten().tolist())) > 5  # a real draw, not one repeated token
    assert not any("forward" in module.__dict__ for module in model.modules())
    with torch.enable_grad(), packed_linears(model), pytest.raises(RuntimeError, match="no_grad"):
        linears[0](torch.ones(1, linears[0].in_features, dtype=torch.bfloat16, requires_grad=True))


def test_greedy_decode_equals_hf_generate(tiny_lm_dir):
    """The loop's cache, positions and left padding do what HF generate does: the same greedy tokens."""
    policy, tokenizer, query = randomised_policy(tiny_lm_dir)
    sampling = SamplingConfig(max_new_tokens=10, merge_adapter=False)
    ours = sampling_loop(policy.policy, query, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         greedy=True).ids
    from transformers import GenerationConfig

    base = policy.policy.get_base_model()
    base.generation_config = GenerationConfig()  # the model's shipped defaults are not greedy decoding
    theirs = policy.policy.generate(**query, do_sample=False, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)[:, query["input_ids"].shape[1]:]
    ours_mask, _ = response_mask_from_eos(ours, tokenizer.eos_token_id, tokenizer.pad_token_id)
    theirs_mask, _ = response_mask_from_eos(theirs, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert torch.equal(ours_mask, theirs_mask[:, : ours.shape[1]]) and ours_mask.sum() > 3
    assert torch.equal(ours[ours_mask], theirs[:, : ours.shape[1]][theirs_mask[:, : ours.shape[1]]])


def test_ended_rows_leave_the_batch_without_changing_what_the_others_sample(tiny_lm_dir):
    """Rows that sampled EOS leave the batch and the KV cache; every row still gets the tokens of a plain loop
    that keeps the whole batch and recomputes every position (no cache), drawing the same uniforms."""
    policy, tokenizer, _ = randomised_policy(tiny_lm_dir)
    model = policy.policy
    with torch.no_grad():  # EOS likely enough that rows end at different steps
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= 4
    words = "hello how are you tell me about the cat dog sun rain day night".split()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": " ".join(words[i : i + 1 + i % 4])}],
                                           tokenize=False, add_generation_prompt=True) for i in range(8)]
    query = encode_prompts(tokenizer, texts, 64, "cpu")
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.5, merge_adapter=False)
    torch.manual_seed(3)
    ours = sampling_loop(model, query, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id).ids

    torch.manual_seed(3)
    ids, mask = query["input_ids"], query["attention_mask"]
    done = torch.zeros(len(ids), dtype=torch.bool)
    plain = []
    with torch.no_grad():
        for step in range(ours.shape[1]):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)).logits[:, -1]
            uniform = torch.rand(len(ids), 1, dtype=torch.float64)
            token = torch.where(done, tokenizer.pad_token_id,
                                next_tokens(logits, step, sampling, tokenizer.eos_token_id, uniform=uniform)[0])
            done |= token == tokenizer.eos_token_id
            plain.append(token)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    plain = torch.stack(plain, 1)
    lengths = response_mask_from_eos(ours, tokenizer.eos_token_id, tokenizer.pad_token_id)[0].sum(-1)
    assert lengths.min() < lengths.max() - 2, lengths  # rows did leave while others went on
    assert torch.equal(ours, plain)


def test_top_p_and_top_k_keep_the_likeliest_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = []
    # top_p 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it, so tokens 1 and 3 stay
    next_tokens(logits, 0, SamplingConfig(top_p=0.7), eos_token_id=0, processed_logits=kept)
    assert torch.isfinite(kept[-1]).tolist() == [[False, True, False, True]]
    # top_k 3 drops the least likely token; temperature 2 halves the kept logits
    next_tokens(logits, 0, SamplingConfig(top_k=3, temperature=2.0), eos_token_id=1, processed_logits=kept)
    assert torch.isfinite(kept[-1]).tolist() == [[False, True, True, True]]
    torch.testing.assert_close(kept[-1][0, 1:], logits[0, 1:] / 2)
    # EOS (token 1) banned before min_new_tokens, whatever its probability
    assert next_tokens(logits, 0, SamplingConfig(min_new_tokens=1), eos_token_id=1, greedy=True)[0].item() == 3
    assert next_tokens(logits, 1, SamplingConfig(min_new_tokens=1), eos_token_id=1, greedy=True)[0].item() == 1


def test_ppo_refuses_truncated_sampling():
    for override in ("sampling.top_p=0.9", "sampling.top_k=20"):
        with pytest.raises(RlftError, match="top_p < 1 or top_k > 0 would sample from another distribution"):
            load_config(PPOConfig, None, [override])


def test_prompts_past_the_context_are_refused(tiny_lm_dir):
    config = ModelConfig(name_or_path=str(tiny_lm_dir))  # max_position_embeddings=256
    tokenizer, model = load_tokenizer(config), load_model(config)
    with pytest.raises(RlftError, match=r"a prompt of 250 tokens plus sampling.max_new_tokens=8 is longer than the "
                                        r"model's context \(256 tokens\)"):
        sample(model, tokenizer, ["hello " * 250], SamplingConfig(max_new_tokens=8, max_prompt_length=300))


def test_output_head_input_is_contiguous_and_kept_logits_are_the_full_ones(tiny_lm_dir):
    """load_model hands the LM head a contiguous hidden state (a strided logits_to_keep slice makes torch copy the
    head once per row): the kept logits are exactly the last positions of the full forward."""
    config = ModelConfig(name_or_path=str(tiny_lm_dir))
    model = load_model(config)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = torch.randint(4, 60, (3, 9))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        kept = model(input_ids=ids, logits_to_keep=4).logits
    assert all(hidden.is_contiguous() for hidden in seen) and seen[-1].shape[1] == 4
    torch.testing.assert_close(kept, full[:, -4:])


def test_half_compute_keeps_float32_adapters_and_their_gradients(tiny_lm_dir):
    """On a bf16 base the adapter multiplies in bf16 (autocast) but stays float32 with float32 gradients, close to
    the float32-adapter path; at B = 0 the policy equals the reference exactly."""
    from rlft.models import half_compute

    config = ModelConfig(name_or_path=str(tiny_lm_dir), dtype="bfloat16")
    torch.manual_seed(0)
    policy = add_lora(load_model(config), config, LoraConfig(r=4, dropout=0.0)).eval()
    ids = torch.randint(4, 60, (3, 9))
    with torch.no_grad(), half_compute(policy):
        fresh = policy(input_ids=ids).logits
        with policy.disable_adapter():
            reference = policy(input_ids=ids).logits
    assert torch.equal(fresh, reference)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    lora = [p for p in policy.parameters() if p.requires_grad]
    grads = {}
    for half in (False, True):
        with half_compute(policy) if half else torch.enable_grad():
            logits = policy(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        grads[half] = [p.grad.clone() for p in lora]
        policy.zero_grad()
        grads[f"logits{half}"] = logits.float().detach()
    assert all(p.dtype == torch.float32 for p in lora) and all(g.dtype == torch.float32 for g in grads[True])
    difference = (grads["logitsTrue"] - grads["logitsFalse"]).abs().mean() / grads["logitsFalse"].abs().mean()
    assert difference < 0.06  # bf16 rounding of the adapter's path , not another function
    for half_grad, grad in zip(grads[True], grads[False]):
        assert torch.nn.functional.cosine_similarity(half_grad.flatten(), grad.flatten(), dim=0) > 0.97  # bf16 matmul gradients, as under the HF Trainer's bf16 autocast


@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0])  # flat (the search widens past k), moderate, peaked
def test_nucleus_keeps_what_a_full_sort_keeps(scale):
    from rlft.generation import nucleus

    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(1)) * scale
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    keep_sorted = probs.cumsum(-1) - probs < 0.9
    expected = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    assert torch.equal(nucleus(logits, 0.9, k=16), expected)


def test_columns_of_padding_shared_by_every_row_change_no_log_prob(tiny_lm_dir):
    """PolicyWithValueHead drops left-padding columns that every row of a micro-batch shares (its prompts were
    padded to the whole rollout's longest): the log-probs and values are those of the unpadded batch."""
    policy, tokenizer, query = randomised_policy(tiny_lm_dir)
    policy = PolicyWithValueHead(policy.policy, critic="head", eos_token_id=tokenizer.eos_token_id).eval()
    with torch.no_grad():
        policy.value_head.weight.normal_()
    response = torch.randint(4, 60, (3, 5))
    input_ids = torch.cat([query["input_ids"], response], 1)
    mask = torch.cat([query["attention_mask"], torch.ones_like(response)], 1)
    padded_ids = torch.cat([torch.full((3, 7), tokenizer.pad_token_id), input_ids], 1)
    padded_mask = torch.cat([torch.zeros(3, 7, dtype=mask.dtype), mask], 1)
    with torch.no_grad():
        plain = policy(input_ids, mask, 5, 1.0)[:2] + (policy.reference_logprobs(input_ids, mask, 5, 1.0)[0],)
        padded = policy(padded_ids, padded_mask, 5, 1.0)[:2] + (policy.reference_logprobs(padded_ids, padded_mask, 5, 1.0)[0],)
    for a, b in zip(plain, padded):
        assert torch.equal(a, b)
