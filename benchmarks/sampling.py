"""Sampling speed of an SFT policy: the LoRA adapter applied on the fly (peft) vs merged into the weights.

    python benchmarks/sampling.py [--adapter runs/quickstart/sft] [--rows 16 64] [--json F]

Whether inference-only stages (preferences, eval's sampling) would gain from sampling on merged weights
(the same function, 7 fewer small matmuls per decoder layer and step), and how much the batch size does.
Each setting: the same prompts, 32 new tokens forced (min_new_tokens), tokens per second of 3 calls after
a warm-up, on this process's threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rlft.data import chatterbot_pairs, render_prompts
from rlft.generation import SamplingConfig, encode_prompts, sampling_loop
from rlft.policy import load_policy


def tokens_per_second(model, tokenizer, texts: list[str], sampling: SamplingConfig, calls: int = 3) -> float:
    prompt = encode_prompts(tokenizer, texts, sampling.max_prompt_length, model.device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling_loop(model, prompt, sampling, eos, pad)  # warm-up
    started = time.perf_counter()
    for _ in range(calls):
        sampling_loop(model, prompt, sampling, eos, pad)
    return calls * len(texts) * sampling.max_new_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="runs/quickstart/sft")
    parser.add_argument("--rows", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    model, tokenizer, _ = load_policy(args.adapter)
    model.eval()
    prompts = [row["prompt"] for row in chatterbot_pairs()[: max(args.rows)]]
    sampling = SamplingConfig(max_new_tokens=32, min_new_tokens=32)
    results = {"threads": torch.get_num_threads(), "adapter": args.adapter}
    for label in ("lora", "merged"):
        if label == "merged":
            model = model.merge_and_unload()
        for rows in args.rows:
            with torch.no_grad():
                results[f"{label}_{rows}"] = tokens_per_second(
                    model, tokenizer, render_prompts(tokenizer, prompts[:rows]), sampling)
    for rows in args.rows:
        print(f"{rows} rows: LoRA {results[f'lora_{rows}']:.0f} tokens/s, merged {results[f'merged_{rows}']:.0f} "
              f"tokens/s ({results[f'merged_{rows}'] / results[f'lora_{rows}']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
