"""How often the embedded SmolLM2-135M-Instruct already answers the built-in `arithmetic` problems: the starting
accuracy a verifiable-reward run has to raise, measured before choosing the task (10% to 60% leaves room to learn
and something to learn from).

    python examples/verifiable/start_accuracy.py --json examples/verifiable/results/start_accuracy.json

On the held-out fifth of the problems (rlft's own split, seed 0), per problem kind and in all, under the model's
own chat template and under ChatML without a system prompt (the quickstart's), sampled at each --temperatures (0:
greedy): accuracy by reward_models.verifiable:accuracy, with its 95% CI.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from reward_models.verifiable import accuracy  # noqa: E402
from rlft.config import DataConfig, ModelConfig  # noqa: E402
from rlft.data import columns_of, load_splits, prompts_of, render_prompts  # noqa: E402
from rlft.generation import SamplingConfig, sample  # noqa: E402
from rlft.models import load_model, load_tokenizer  # noqa: E402
from rlft.results import machine  # noqa: E402


def interval(hits: list[float]) -> dict:
    """Mean and a normal 95% CI of 0/1 outcomes."""
    n, mean = len(hits), sum(hits) / len(hits)
    half = 1.96 * math.sqrt(mean * (1 - mean) / n)
    return {"n": n, "accuracy": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=400, help="held-out problems measured")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.0], help="0: greedy")
    parser.add_argument("--templates", nargs="+", choices=["model", "chatml"], default=["model", "chatml"])
    parser.add_argument("--json", help="write the results here (and a table beside it, .md)")
    args = parser.parse_args()

    _, held_out, _ = load_splits(DataConfig(path="arithmetic", eval_fraction=0.2), ("prompt_only", "conversational"))
    held_out = held_out.select(range(min(args.problems, len(held_out))))
    prompts, answers = prompts_of(held_out), columns_of(held_out)["answer"]
    kinds = [prompt[-1]["content"].split()[3] for prompt in prompts]  # plus, minus, times
    results = {"machine": machine(), "argv": sys.argv[1:], "rows": []}
    for template in args.templates:
        model_config = replace(ModelConfig(), chat_template="" if template == "model" else "chatml")
        tokenizer, model = load_tokenizer(model_config), load_model(model_config)
        texts = render_prompts(tokenizer, prompts)
        for temperature in args.temperatures:
            started, greedy = time.time(), temperature == 0
            sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=temperature or 1.0)
            replies = [text for batch in sample(model, tokenizer, texts, sampling, args.batch_size, greedy=greedy)
                       for text in batch.texts]
            hits = accuracy(prompts, replies, answer=answers)
            row = {"template": template, "sampling": "greedy" if greedy else f"temperature {temperature:g}", **interval(hits),
                   "by_kind": {kind: interval([h for h, k in zip(hits, kinds) if k == kind]) for kind in sorted(set(kinds))},
                   "examples": [{"prompt": p[-1]["content"], "reply": r, "answer": a}
                                for p, r, a in list(zip(prompts, replies, answers))[:5]],
                   "seconds": time.time() - started}
            results["rows"].append(row)
            print(f"{template:7s} {row['sampling']:14s} {row['accuracy']:.1%} "
                  + " ".join(f"{k} {v['accuracy']:.0%}" for k, v in row["by_kind"].items()), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        lines = [f"Starting accuracy of SmolLM2-135M-Instruct on {results['rows'][0]['n']} held-out `arithmetic` "
                 f"problems ({results['machine']}), by reward_models.verifiable:accuracy; written by "
                 "examples/verifiable/start_accuracy.py.", "",
                 "| template | sampling | accuracy (95% CI) | plus | minus | times |", "|---|---|---|---|---|---|"]
        for row in results["rows"]:
            kinds_text = " | ".join(f"{row['by_kind'][k]['accuracy']:.0%}" for k in ("plus", "minus", "times"))
            lines.append(f"| {row['template']} | {row['sampling']} | {row['accuracy']:.1%} "
                         f"({row['ci95'][0]:.1%}-{row['ci95'][1]:.1%}) | {kinds_text} |")
        path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
