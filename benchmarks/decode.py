"""Where a rollout's decode time goes: rlft's sampler against the fastest decode of the same policy outside it.

    python benchmarks/decode.py [--rows 16 64] [--new-tokens 32] [--dtype float32] [--json F]
    python benchmarks/decode.py --natural runs/quickstart/sft --calls 8 --variants rlft,rlft_full_batch,hf_merged

The policy is what PPO samples from: the embedded SmolLM2 with a fresh LoRA adapter (r=16, all-linear; its B
is zero-initialised, so every variant computes the same function). Every variant generates exactly
`--new-tokens` tokens (EOS banned) from the same chatterbot prompts; tokens/s is over 3 calls after a warm-up
(with `--rounds R`, the median of R such rounds, the variants taking turns: a noisy machine slows all alike).
With `--natural ADAPTER` the policy is that adapter (an SFT output) and responses end at EOS, as in the
preferences and eval stages: tokens/s counts real response tokens (through EOS); call i of each variant is
seeded i, so rlft's variants sample the same responses (but where bf16 rounding differs with the batch's
size and flips a draw; HF generate draws differently, so its lengths differ),
and `--calls` more calls average over more batches' longest responses, which decide a call's steps.

- `rlft`: rlft.generation.sample, what PPO, preferences and eval call (the adapter merged while sampling);
  `rlft_unmerged` the same with `sampling.merge_adapter=false`; `rlft_unpacked` with `sampling.pack_weights=false`
  (F.linear reordering each bf16 weight for oneDNN at every call); `rlft_full_batch` the same with ended rows
  kept in the batch (`sampling_loop(drop_ended=False)`);
- `hf_generate`: plain `model.generate(do_sample=True)` on the same PEFT model (the HF baseline);
- `hf_merged`: the same on a merged copy of the weights (no LoRA matmuls);
- `hf_static`: generate with `cache_implementation="static"` on the merged copy;
- `floor`: the model's own cached forward, one token per row per step, and nothing else (no sampling, no
  stopping checks): the eager model's cost, the bound a sampling loop can approach; `floor_lora` the same
  on the unmerged PEFT model.

Every run also measures the **memory floor** of a decode step: the bytes of weights one step must read (every
weight of the merged model once; the input embedding table only where the output head is tied to it) over the
bandwidth at which this machine streams a tensor far larger than its caches into torch's threads. No decode
step can be faster; each variant's ms per step is reported against it (`over_memory_floor`).
Figures depend on the CPU's vector ISA and thread count: benchmarks/results/decode.json and decode_natural.json
hold the command that wrote them (their `argv` field) and the thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rlft.config import LoraConfig, ModelConfig
from rlft.data import chatterbot_pairs, render_prompts
from rlft.generation import (SamplingConfig, cache_argument, encode_prompts, position_ids_for,
                             response_mask_from_eos, sampling_loop)
from rlft.models import add_lora, load_model, load_tokenizer
from rlft.policy import load_policy


def timed(function, calls: int = 3) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls


@torch.no_grad()
def floor(model, prompt: dict, new_tokens: int) -> None:
    from transformers import DynamicCache

    cache = {cache_argument(model): DynamicCache()}
    mask = prompt["attention_mask"]
    positions = position_ids_for(mask)
    output = model(input_ids=prompt["input_ids"], attention_mask=mask, position_ids=positions,
                   **cache, use_cache=True, logits_to_keep=1)
    token = output.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        positions = positions[:, -1:] + 1
        output = model(input_ids=token, attention_mask=mask, position_ids=positions, **cache, use_cache=True)
        token = output.logits[:, -1].argmax(-1, keepdim=True)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second streamed from memory by torch's threads: a sum over `gib` GiB of float32, far larger
    than any cache, the access pattern of a decode step reading every weight once."""
    data = torch.ones(int(gib * 2**30) // 4)
    data.sum()  # pages touched, threads up
    started = time.perf_counter()
    for _ in range(repeats):
        data.sum()
    return repeats * data.numel() * 4 / (time.perf_counter() - started)


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (`parameters()` lists a tied one once), but
    the input embedding table, of which a step reads one row per token, unless the output head is that table."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--variants", default="rlft,hf_generate,hf_merged,hf_static,floor")
    parser.add_argument("--natural", default="", help="an SFT adapter folder: sample it until EOS")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per variant, after one warm-up")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of every variant in turn; each variant's figure is its median round")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.natural:
        policy, tokenizer, _ = load_policy(args.natural)  # in the dtype its SFT run chose (--dtype unused)
        args.dtype = str(policy.get_base_model().dtype).removeprefix("torch.")
    else:
        model_config = ModelConfig(name_or_path="smollm2-135m-instruct", chat_template="chatml", dtype=args.dtype)
        tokenizer = load_tokenizer(model_config)
        policy = add_lora(load_model(model_config), model_config, LoraConfig(r=16, alpha=32, dropout=0.0))
    policy.eval()
    merged = copy.deepcopy(policy).merge_and_unload()
    forced = 0 if args.natural else args.new_tokens
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, min_new_tokens=forced, top_p=args.top_p)
    unmerged = SamplingConfig(max_new_tokens=args.new_tokens, min_new_tokens=forced, top_p=args.top_p,
                              merge_adapter=False)
    unpacked = SamplingConfig(max_new_tokens=args.new_tokens, min_new_tokens=forced, top_p=args.top_p,
                              pack_weights=False)
    texts = render_prompts(tokenizer, [row["prompt"] for row in chatterbot_pairs()[: max(args.rows)]])
    hf = {"do_sample": True, "max_new_tokens": args.new_tokens, "min_new_tokens": forced, "top_p": args.top_p,
          "top_k": 0, "pad_token_id": tokenizer.pad_token_id}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    variants = {
        "rlft": lambda prompt: sampling_loop(policy, prompt, sampling, eos, pad).ids,
        "rlft_unmerged": lambda prompt: sampling_loop(policy, prompt, unmerged, eos, pad).ids,
        "rlft_unpacked": lambda prompt: sampling_loop(policy, prompt, unpacked, eos, pad).ids,
        "rlft_full_batch": lambda prompt: sampling_loop(policy, prompt, sampling, eos, pad, drop_ended=False).ids,
        "hf_generate": lambda prompt: policy.generate(**prompt, **hf),
        "hf_merged": lambda prompt: merged.generate(**prompt, **hf),
        "hf_static": lambda prompt: merged.generate(**prompt, **hf, cache_implementation="static"),
        "floor": lambda prompt: floor(merged, prompt, args.new_tokens),
        "floor_lora": lambda prompt: floor(policy, prompt, args.new_tokens),
    }
    results = {"argv": sys.argv[1:], "threads": torch.get_num_threads(), "dtype": args.dtype,
               "new_tokens": args.new_tokens, "natural": args.natural, "runs": {}}
    bandwidth, weights = read_bandwidth(), weight_bytes_per_step(merged)
    floor_ms = 1000 * weights / bandwidth
    results["memory_floor"] = {"read_gb_per_s": bandwidth / 1e9, "weight_mb": weights / 1e6, "ms_per_step": floor_ms}
    print(f"memory floor: {weights / 1e6:.0f} MB of weights a step at {bandwidth / 1e9:.1f} GB/s = {floor_ms:.1f} ms "
          "a step", flush=True)
    for rows in args.rows:
        prompt = encode_prompts(tokenizer, texts[:rows], sampling.max_prompt_length, policy.device)
        width = prompt["input_ids"].shape[1]
        names = args.variants.split(",")
        rounds: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):  # variants interleaved: a neighbour's load lands on all of them alike
            for name in names:
                generated = []

                def call():
                    torch.manual_seed(len(generated))  # call i of every variant draws with seed i
                    response = variants[name](prompt)
                    generated.append(response[:, width:] if name.startswith("hf") else response)
                rounds[name].append(timed(call, args.calls))
                if args.natural:  # real tokens (through each row's EOS) per timed call
                    tokens = sum(response_mask_from_eos(r, eos, pad)[0].sum().item()
                                 for r in generated[1:]) / args.calls
                else:
                    tokens = rows * args.new_tokens
                seconds = statistics.median(rounds[name])
                ms_per_step = 1000 * seconds / args.new_tokens
                results["runs"][f"{name}_{rows}"] = {"rows": rows, "seconds": seconds, "rounds_seconds": rounds[name],
                                                     "tokens": tokens, "tokens_per_s": tokens / seconds,
                                                     "ms_per_step": ms_per_step,
                                                     "over_memory_floor": ms_per_step / floor_ms}
                print(f"{rows:>3} rows  {name:<15} {tokens / rounds[name][-1]:7.0f} tokens/s  "
                      f"{rounds[name][-1]:6.2f} s/call  {tokens:7.1f} tokens/call  "
                      f"{1000 * rounds[name][-1] / args.new_tokens / floor_ms:5.1f}x the memory floor", flush=True)
    for key, run in results["runs"].items():
        print(f"{key:<22} median of {len(run['rounds_seconds'])} rounds: {run['tokens_per_s']:7.0f} tokens/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
