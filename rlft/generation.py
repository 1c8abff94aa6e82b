"""Batched sampling from a causal LM: left-padded prompts, KV cache, responses cut (and masked) at EOS.

One implementation for every stage that generates: PPO rollouts, preference building, eval, SFT samples.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from functools import partial
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from peft.tuners import lora
from peft.tuners.tuners_utils import BaseTunerLayer
from tqdm.auto import tqdm
from transformers import DynamicCache

from rlft.config import ModelConfig, option, require
from rlft.distributed import is_sharded
from rlft.errors import RlftError
from rlft.models import configured_context_length, context_length, half_compute
from rlft.policy import active_adapter


@dataclass
class SamplingConfig:
    max_new_tokens: int = option(32, "Longest response in tokens.")
    temperature: float = option(1.0, "Sampling temperature; PPO recomputes log-probs at the same temperature.")
    top_p: float = option(1.0, "Nucleus sampling mass (1.0: off).")
    top_k: int = option(0, "Sample from the k most likely tokens (0: off).")
    min_new_tokens: int = option(
        0, "Forbid EOS for the first this many tokens (0: off). PPO's and eval's log-probs and KL apply the same ban "
        "to policy and reference, so they describe what was sampled.")
    max_prompt_length: int = option(256, "Prompts longer than this many tokens are an error, not silently cut.")
    merge_adapter: bool = option(True, "Sample on the LoRA adapter merged into a temporary copy of the weights it "
                                 "adapts (exact again afterwards): the base model's decode speed for one extra copy "
                                 "of those weights while sampling. PPO's log-probs are recomputed unmerged either way. "
                                 "Skipped for quantized bases, DoRA and FSDP-sharded models.")
    pack_weights: bool = option(True, "On CPU in bf16, decode from a copy of every linear weight prepacked for "
                                "oneDNN (generation.packed_linears): the same tokens and log-probs bit for bit, "
                                "faster at few rows, for a copy of those weights while sampling (in place of "
                                "merge_adapter's copy of the layers it merges).")

    def __post_init__(self):
        require(self.max_new_tokens > 0, "max_new_tokens", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0 (use a small value for near-greedy)")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.top_k >= 0, "top_k", "must be >= 0")
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "must be in [0, max_new_tokens]")
        require(self.max_prompt_length > 0, "max_prompt_length", "must be >= 1")


def check_prompt_lengths(tokenizer, prompt_texts: list[str], sampling: SamplingConfig,
                         model_config: ModelConfig) -> list[int]:
    """Every prompt within sampling.max_prompt_length, and with max_new_tokens within the model's context (read
    from its config alone): said before the weights load, not when a batch draws the prompt (PPO, eval,
    preferences and `rlft plan` call it first). Returns each prompt's length in tokens."""
    lengths = [len(ids) for ids in tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]]
    too_long = sum(length > sampling.max_prompt_length for length in lengths)
    if too_long:
        raise RlftError(
            f"{too_long} of {len(lengths)} prompts are longer than sampling.max_prompt_length="
            f"{sampling.max_prompt_length} tokens (longest {max(lengths)}): raise the limit or filter the prompts"
        )
    context = configured_context_length(model_config)
    if context and max(lengths) + sampling.max_new_tokens > context:
        past = sum(length + sampling.max_new_tokens > context for length in lengths)
        raise RlftError(
            f"{past} of {len(lengths)} prompts (longest {max(lengths)} tokens) plus sampling.max_new_tokens="
            f"{sampling.max_new_tokens} are longer than the model's context ({context} tokens): filter the prompts, "
            "or lower sampling.max_new_tokens")
    return lengths


class OffPolicyError(RlftError):
    """Samples that were not drawn from the policy whose log-probs are recomputed (off_policy)."""


def off_policy(where: str, gap: float, option: str, limit: float, model_name: str) -> OffPolicyError:
    """The one line for samples whose sampler log-probs (mean |difference| per token `gap`, nats) are past `limit`
    from the ones the policy's forward recomputes: PPO's rollouts and eval's samples alike."""
    return OffPolicyError(
        f"{where} the sampler's log-probs of its own tokens differ from the recomputed ones by {gap:.2f} nats per "
        f"token on average ({option}={limit:g}): '{model_name}' does not decode in rlft's sampling loop as it scores "
        f"whole sequences (a model that ignores the KV cache argument?); report it with the model's name, or raise "
        f"{option} if the gap is expected")


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


class Sampled(NamedTuple):
    """What the sampling loop drew. T <= max_new_tokens; after a row's first EOS its slots are padding."""

    ids: torch.Tensor  # (B, T) response token ids
    logprobs: torch.Tensor  # (B, T) float32: log-prob of each drawn token under the distribution it was drawn from


class Responses(NamedTuple):
    """Sampled responses to one batch of B prompts, as every stage that generates gets them. T <= max_new_tokens."""

    query: dict[str, torch.Tensor]  # the prompts, left-padded: input_ids and attention_mask (B, P)
    ids: torch.Tensor  # (B, T) response token ids, padding after the first EOS
    mask: torch.Tensor  # (B, T) bool: tokens up to and including the first EOS
    ended_with_eos: torch.Tensor  # (B,) bool: False where the reply was cut at max_new_tokens
    logprobs: torch.Tensor  # (B, T) float32: the sampler's own log-prob of each token, 0 at padding
    texts: list[str]  # each response's text, up to its first EOS


@torch.no_grad()
def sample(model, tokenizer, prompt_texts: list[str], sampling: SamplingConfig, batch_size: int | None = None,
           greedy: bool = False) -> list[Responses]:
    """Sample one response to each templated prompt, in batches of `batch_size` (None: one batch), in eval mode.

    The one way rlft generates: PPO's rollouts, eval, preference pairs and SFT's sample replies all call it.
    Samples from softmax(logits / temperature) (with top_p / top_k when set) and nothing else: the sampling
    defaults a model ships in generation_config.json (repetition_penalty, no_repeat_ngram_size, its own top_k,
    ...) are never read, so PPO's recomputed log-probs describe exactly what was sampled. A model with its own
    `sampling_loop` (rlft.ppo.model.PolicyWithValueHead: under FSDP2 a registered forward method) decodes
    through it; anything else through `sampling_loop` here.
    """
    size = batch_size or len(prompt_texts)
    starts = range(0, len(prompt_texts), size)
    device = model.get_input_embeddings().weight.device  # where the inputs go
    context, eos, pad = context_length(model), tokenizer.eos_token_id, tokenizer.pad_token_id
    own = getattr(model, "sampling_loop", None)
    loop = (lambda query: own(query, sampling, eos, pad, greedy)) if own is not None else (
        lambda query: sampling_loop(model, query, sampling, eos, pad, greedy, synced=is_sharded(model)))
    was_training = model.training
    model.eval()  # no dropout: a sampled token's log-prob is the one the trainer recomputes
    batches = []
    try:
        for start in tqdm(starts, desc="generate", disable=len(starts) < 2):
            query = encode_prompts(tokenizer, prompt_texts[start : start + size], sampling.max_prompt_length, device)
            width = query["input_ids"].shape[1]
            if context and width + sampling.max_new_tokens > context:
                raise RlftError(
                    f"a prompt of {width} tokens plus sampling.max_new_tokens={sampling.max_new_tokens} is longer "
                    f"than the model's context ({context} tokens): lower sampling.max_prompt_length or max_new_tokens"
                )
            drawn = loop(query)
            mask, ended = response_mask_from_eos(drawn.ids, eos, pad)
            # Tokens after the reply's end are padding for every later pass, whatever the sampler filled them with.
            ids = torch.where(mask, drawn.ids, pad)
            batches.append(Responses(query, ids, mask, ended, torch.where(mask, drawn.logprobs, 0),
                                     response_texts(tokenizer, ids)))
    finally:
        model.train(was_training)
    return batches


@torch.no_grad()
def sampling_loop(model, prompt: dict[str, torch.Tensor], sampling: SamplingConfig, eos_token_id: int,
                  pad_token_id: int, greedy: bool = False, synced: bool = False, drop_ended: bool = True) -> Sampled:
    """The sampling loop: one cached forward per token, then `next_tokens`; ids and log-probs (B, <= max_new_tokens).

    model: a HF causal LM or a peft model of one; with `sampling.merge_adapter` its LoRA adapter is merged for
    the loop (`merged_adapter`). Leaner than HF `generate` (no logits-processor or stopping-criteria machinery,
    no per-step input preparation): benchmarks/decode.py measures the difference. Rows that have sampled EOS
    leave the batch (and the KV cache): a batch runs until its longest response ends, and short replies are
    the common case. Every row still draws its uniform each step, so which rows are left does not change what
    the others sample (drop_ended=False keeps them in: benchmarks/decode.py --natural compares). synced: keep
    stepping until every process is done (FSDP2 gathers each layer from all of them at every step), with every
    row in. The log-probs are the sampler's own, kept so that PPO can check them against its recomputed ones.
    """
    mask = prompt["attention_mask"]
    positions = position_ids_for(mask)
    batch = len(mask)
    rows = torch.arange(batch, device=mask.device)  # the rows still in the batch, in the cache's order
    done = torch.zeros(batch, dtype=torch.bool, device=mask.device)
    response = torch.full((batch, sampling.max_new_tokens), pad_token_id, dtype=torch.long, device=mask.device)
    logprobs = torch.zeros((batch, sampling.max_new_tokens), dtype=torch.float32, device=mask.device)
    with decoding_weights(model, sampling, synced):
        cache, argument = DynamicCache(config=model.config), cache_argument(model)
        # Mamba-1 blocks multiply the mask into their inputs position by position: past the prefill, their own
        # generate passes none (one new token, never padding); every other model reads the whole mask
        whole_mask = getattr(model.config, "model_type", None) not in MASK_PREFILL_ONLY
        inputs = prompt["input_ids"]
        for step in range(sampling.max_new_tokens):
            logits = model(input_ids=inputs, attention_mask=mask if whole_mask or step == 0 else None,
                           position_ids=positions, **{argument: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
            uniform = None if greedy else torch.rand(batch, 1, device=mask.device, dtype=torch.float64)[rows]
            token, logprob = next_tokens(logits, step, sampling, eos_token_id, greedy, uniform=uniform)
            token = torch.where(done[rows], pad_token_id, token)  # only where synced keeps ended rows in
            response[rows, step], logprobs[rows, step] = token, logprob
            done[rows] |= token == eos_token_id
            if step + 1 == sampling.max_new_tokens or all_done(done, synced):
                break
            if drop_ended and not synced and bool(done[rows].any()):
                still = (~done[rows]).nonzero().squeeze(-1)
                cache.reorder_cache(still)  # index_select along the batch of every layer's keys and values
                rows, token, mask, positions = rows[still], token[still], mask[still], positions[still]
            inputs = token[:, None]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
    return Sampled(response[:, : step + 1], logprobs[:, : step + 1])


MASK_PREFILL_ONLY = {"mamba", "falcon_mamba"}  # model types whose decoding steps take no attention mask


def cache_argument(model) -> str:
    """The name under which the model's forward takes its KV cache: `cache` from transformers 5.25 on (where
    `past_key_values` is deprecated, and some models, Mamba among them, silently ignore it), `past_key_values`
    before. A peft model's forward takes **kwargs: its base model's signature decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def ban_early_eos(logits: torch.Tensor, positions: torch.Tensor, eos_token_id: int,
                  min_new_tokens: int) -> torch.Tensor:
    """Logits (..., V) of response tokens with EOS at -inf where the sampler banned it: positions (...) is each
    token's index in its response (0: the first; any shape that broadcasts against the logits' leading
    dimensions), banned while below min_new_tokens. The distribution actually sampled from, so every log-prob
    and KL of a policy sampled with a length floor is one of that policy, and its reference's is under the same
    floor."""
    if not min_new_tokens:
        return logits
    # shaped like positions, not like the logits: PPO's (T, V) mask broadcasts over its B rows
    banned = torch.zeros(*positions.shape, logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[..., eos_token_id] = positions.to(logits.device) < min_new_tokens
    return logits.masked_fill(banned, float("-inf"))


def next_tokens(logits: torch.Tensor, step: int, sampling: SamplingConfig, eos_token_id: int, greedy: bool = False,
                processed_logits: list | None = None,
                uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from logits (B, V): EOS banned before min_new_tokens, then logits / temperature, top_k,
    top_p (HF's order), softmax and a draw by `uniform` (B, 1) float64 in [0, 1), else one from the global torch
    generator; argmax when greedy. -> (tokens (B,) long, their log-probs (B,) float32 under the distribution
    drawn from). processed_logits: if given, the (B, V) logits drawn from are appended to it."""
    logits = logits.float()
    if step < sampling.min_new_tokens:
        logits = logits.clone()  # the caller's tensor stays as it was
        logits[:, eos_token_id] = float("-inf")
    if greedy:
        token = logits.argmax(-1)
        return token, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
    if sampling.temperature != 1:
        logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        logits = logits.masked_fill(~nucleus(logits, sampling.top_p), float("-inf"))
    if processed_logits is not None:
        processed_logits.append(logits)
    # Inverse-CDF draw, one uniform per row: torch.multinomial draws an exponential per vocabulary entry (73 ms
    # a step at 64 x 49152 here, against 2). The CDF is float64 so tokens of tiny probability keep their mass.
    cdf = logits.softmax(-1).cumsum(-1, dtype=torch.float64)
    if uniform is None:
        uniform = torch.rand(len(cdf), 1, device=cdf.device, dtype=torch.float64)
    token = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return token, logits.gather(-1, token[:, None]).squeeze(-1) - logits.logsumexp(-1)


def nucleus(logits: torch.Tensor, top_p: float, k: int = 256) -> torch.Tensor:
    """(B, V) bool: the most likely tokens of each row until their mass reaches top_p (always the first one).

    Searches the k most likely tokens first, widening k until every row's top_p mass lies within it: a full sort of
    the vocabulary costs 300 ms a step at 64 x 49152 here, topk(256) 13 ms, and a nucleus of 0.95 rarely
    needs more. Tokens past the k-th are then outside the nucleus too, so the kept set is what a sort keeps.
    """
    vocab = logits.shape[-1]
    log_total = logits.logsumexp(-1, keepdim=True)
    while True:
        k = min(k, vocab)
        top, index = logits.topk(k, dim=-1)  # sorted, most likely first
        probs = (top - log_total).exp()
        mass = probs.cumsum(-1)
        if k == vocab or bool((mass[:, -1] >= top_p).all()):
            break
        k *= 4
    keep = mass - probs < top_p
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, index, keep)


def all_done(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row has ended, on every process when `synced` (a collective: all must call it)."""
    if not synced:
        return bool(done.all())
    pending = (~done).any().to(torch.int32).reshape(1)
    dist.all_reduce(pending, op=dist.ReduceOp.MAX)
    return not pending.item()


@contextmanager
def decoding_weights(model, sampling: SamplingConfig, synced: bool):
    """The weights the sampling loop reads, for the duration: the adapter merged (merged_adapter), else its
    matmuls at the base's precision (half_compute); prepacked for oneDNN on CPU in bf16 (packed_linears); as
    they are under FSDP2, whose sharded weights are gathered layer by layer."""
    if synced:
        with half_compute(model):
            yield
    elif sampling.merge_adapter:
        with merged_adapter(model, pack=sampling.pack_weights):
            yield
    else:
        with half_compute(model), packed_linears(model) if sampling.pack_weights else nullcontext():
            yield


@contextmanager
def merged_adapter(model, pack: bool = False):
    """A peft LoRA model's active adapter merged into the weights it touches, for the duration; exact afterwards.

    Each adapted layer's base weight is swapped for weight + scaling * B @ A (peft's `get_delta_weight`) and the
    original tensor is put back on exit: no arithmetic on the original, so the reference (adapters off) is
    bit-identical after sampling. Costs one copy of the adapted weights while inside; saves the adapter's two
    extra matmuls per layer and decoding step (benchmarks/decode.py: the unmerged adapter costs a third of a
    step). A no-op, sampling through the adapter, for what cannot merge exactly this way: no adapter active,
    quantized base weights, MoE expert parameters, DoRA, or adapters other than LoRA. pack: every linear layer
    prepacked (packed_linears), an adapted one from its merged weight, which is then the one copy it costs (its
    `.weight` stays the unmerged one: the module computes merged, code reading the tensor directly would not).
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    mergeable = layers and all(
        # plain weight matrices only: not bitsandbytes' layers, nor MoE experts' stacked parameters
        isinstance(layer, (lora.Linear, lora.Embedding)) and not layer.disable_adapters
        and len(layer.active_adapters) == 1 and not layer.use_dora.get(layer.active_adapters[0], False)
        and type(getattr(layer.get_base_layer(), "weight", None)) is torch.nn.Parameter
        and layer.get_base_layer().weight.dtype.is_floating_point
        for layer in layers
    )
    if not mergeable:
        with packed_linears(model) if pack else nullcontext():
            yield
        return
    pack = pack and packing_supported()
    swapped, packed = [], []
    try:
        with torch.no_grad():
            for layer in layers:
                adapter, base = layer.active_adapters[0], layer.get_base_layer()
                if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
                    continue  # a layer this adapter does not touch
                original = base.weight.data
                if isinstance(layer, lora.Linear) and not layer.fan_in_fan_out:  # one fused W + s * B @ A
                    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                    merged = torch.addmm(original, b.to(original.dtype), a.to(original.dtype),
                                         alpha=layer.scaling[adapter])
                else:  # embeddings, GPT-2's transposed Conv1D: peft's own delta
                    merged = original + layer.get_delta_weight(adapter).to(original.dtype)
                if pack and packable(base):
                    pack_linear(base, merged)
                    packed.append(base)
                else:
                    swapped.append((base, original))
                    base.weight.data = merged
        with active_adapter(model, None), packed_linears(model) if pack else nullcontext():
            yield
    finally:
        for base, original in swapped:
            base.weight.data = original
        for base in packed:
            del base.forward


@contextmanager
def packed_linears(model):
    """Every plain bf16 linear layer of a model on CPU reading its weight prepacked in oneDNN's blocked layout, for
    the duration (inference only), but those whose forward is set already (merged_adapter's packed ones).

    F.linear on a bf16 CPU weight calls the same oneDNN kernel but reorders the weight into that layout at every
    call, which costs most where a matmul is smallest: decoding a few rows (benchmarks/results/decode_packed.json,
    rlft against rlft_unpacked: 1.24x the tokens/s at 16 rows, 1.12x at 64). The outputs are bit-identical
    (tests/test_sampling.py), so the sampler's tokens and log-probs are what they were. Costs a copy of the
    weights it packs while inside. A no-op off CPU, for float32 and quantized layers, and where this torch or CPU
    has no oneDNN bf16 kernels.
    """
    packed = []
    try:
        for layer in [m for m in model.modules() if packable(m)] if packing_supported() else []:
            pack_linear(layer, layer.weight)
            packed.append(layer)
        yield
    finally:
        for layer in packed:
            del layer.forward


def packing_supported() -> bool:
    """Whether this torch and CPU have oneDNN's bf16 linear kernels (AVX512-BF16 or AMX; not AVX2-only CPUs), and
    F.linear uses them (not switched off by torch.backends.mkldnn.enabled = False)."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packable(layer: torch.nn.Module) -> bool:
    return (type(layer) is torch.nn.Linear and type(layer.weight) is torch.nn.Parameter
            and layer.weight.dtype == torch.bfloat16 and layer.weight.device.type == "cpu"
            and "forward" not in layer.__dict__)


def pack_linear(layer: torch.nn.Linear, weight: torch.Tensor) -> None:
    """layer computes from a prepacked copy of `weight` until `del layer.forward`: an instance attribute, which
    nn.Module.__call__ (hooks and all) calls as its forward."""
    layer.forward = partial(packed_linear, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16), layer.bias)


def packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight, bias) from `packed`, oneDNN's prepacked copy of the weight (packed_linears); from a
    plain copy of it for an input of another dtype. Inference only: no gradient reaches the weight's parameter."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("a linear layer with prepacked weights (rlft.generation.packed_linears) was called with "
                           "gradients on: packed weights are for sampling under torch.no_grad()")
    if x.dtype != packed.dtype:
        return torch.nn.functional.linear(x, packed.to_dense(), bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` assigns them, so recomputed log-probs match."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_ids(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each response's token ids up to and including its first EOS (ids, mask: (B, T)): what a function scorer
    receives as `completion_ids`, as TRL's reward functions do (a length penalty counts tokens, not characters)."""
    return [row[:length] for row, length in zip(ids.tolist(), mask.sum(-1).tolist())]


def response_texts(tokenizer, response_ids: torch.Tensor) -> list[str]:
    """Text of each response up to (not including) its first EOS."""
    texts = []
    for row in response_ids.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


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
