"""The verifiable quickstart (configs/quickstart_verifiable.yaml) over seeds, in one table, beside GRPO.

    python examples/verifiable/seeds.py --seeds 0 1 2
    python examples/verifiable/seeds.py --variant grpo --seeds 0 1 2

For each seed S, `rlft pipeline --config configs/quickstart_verifiable.yaml seed=S` (and the variant's overrides)
on 2 threads in runs/verifiable/<variant>/seedS (a finished one is reused; `--table-only` only redoes the table
from every finished run). From its report: the
held-out exact-match accuracy of the trained policy and of the model it started from (the base, its reference),
each with its 95% CI, on the same held-out problems and sampling; the gain; exact KL; length and distinct-1 over
the base's; the pipeline's minutes. The table goes to examples/verifiable/results/seeds.{json,md} and into the
results page (examples/verifiable/README.md) between its `<!-- seeds -->` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rlft.results import machine, write_between_markers  # noqa: E402

CONFIG = "configs/quickstart_verifiable.yaml"
VARIANTS = {  # name: (label, overrides); the first is the config as shipped
    "ppo": ("PPO (critic, GAE; shipped)", ()),
    # 8 replies to each of 8 problems a step: as many replies as PPO's, advantages from each problem's group
    "grpo": ("GRPO", ("ppo.ppo.advantage_estimator=grpo", "ppo.ppo.num_generations=8")),
}
SHIPPED = "ppo"
RESULTS = ROOT / "examples" / "verifiable" / "results" / "seeds.json"
PAGE = ROOT / "examples" / "verifiable" / "README.md"
MARKERS = ("<!-- seeds: written by examples/verifiable/seeds.py -->", "<!-- /seeds -->")
README = ROOT / "README.md"
HEADLINE = ("<!-- verifiable: written by examples/verifiable/seeds.py -->", "<!-- /verifiable -->")
BARS = [  # the bars, every seed: (test, wording)
    (lambda r: r["gain"] >= 0.15, "accuracy +15 points or more"),
    (lambda r: r["accuracy_ci_low"] > r["start_accuracy"], "trained CI low above the start"),
    (lambda r: r["problems"] >= 200, ">= 200 held-out problems"),
    (lambda r: r["wall_time_min"] <= 15, "<= 15 minutes on 2 threads"),
]


def folder(variant: str, seed: int) -> Path:
    return ROOT / "runs" / "verifiable" / variant / f"seed{seed}"


def run(variant: str, seed: int, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "rlft", "pipeline", "--config", CONFIG, f"seed={seed}",
               f"output_dir={folder(variant, seed)}", *VARIANTS[variant][1]]
    print("+", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def figures(variant: str, seed: int) -> dict:
    """One finished run's row: the trained policy against the base it started from, on held-out problems."""
    report = json.loads((folder(variant, seed) / "eval" / "report.json").read_text())
    policy = report["policies"][0]
    gold = policy["rewards"][report["gold"]]
    timings = json.loads((folder(variant, seed) / "pipeline.json").read_text())["stage_wall_time_s"]
    row = {
        "variant": variant, "seed": seed, "problems": report["prompts"]["count"], "temperature": report["sampling"]["temperature"],
        "start_accuracy": gold["reference"]["mean"], "start_ci95": gold["reference"]["ci95"],
        "accuracy": gold["policy"]["mean"], "accuracy_ci95": gold["policy"]["ci95"],
        "accuracy_ci_low": gold["policy"]["ci95"][0],
        "gain": gold["policy"]["mean"] - gold["reference"]["mean"],
        "halfway": halfway_accuracy(report),
        "kl_exact": policy["kl"]["exact"]["mean"],
        "length_ratio": policy["response"]["policy"]["length"]["mean"]
        / policy["response"]["reference"]["length"]["mean"],
        "distinct_1_ratio": policy["hacking"]["diversity"]["policy"]["distinct_1"]
        / policy["hacking"]["diversity"]["reference"]["distinct_1"],
        "result_step": json.loads((folder(variant, seed) / "ppo" / "metrics.json").read_text()).get("result_step"),
        "wall_time_min": sum(timings.values()) / 60, "stage_minutes": {k: v / 60 for k, v in timings.items()},
        "samples": [{"prompt": s["prompt"], "policy": s["policy"], "reference": s["reference"]}
                    for s in policy["samples"][:4]],
    }
    row["bars_missed"] = [wording for test, wording in BARS if not test(row)] if variant == SHIPPED else None
    return row


def halfway_accuracy(report: dict) -> list | None:
    """[step, accuracy] of the checkpoint before the last (step 10 of 20): did accuracy peak before the end?"""
    checkpoints = sorted(report["checkpoints"], key=lambda c: c["step"])
    if len(checkpoints) < 2:
        return None
    return [checkpoints[-2]["step"], checkpoints[-2]["rewards"][report["gold"]]["policy"]["mean"]]


def halfway(row: dict) -> str:
    return f"{row['halfway'][1]:.1%} (step {row['halfway'][0]})" if row["halfway"] else "-"


def markdown(results: dict) -> str:
    lines = [f"`{CONFIG}` on {results['machine']}, 2 threads. Held-out exact-match accuracy "
             "(reward_models.verifiable:accuracy) of the trained policy and of the base it started from (its reference), "
             "both sampled as in training, with 95% CIs; halfway: the policy's accuracy at its middle checkpoint; exact KL "
             "summed over the reply; length and distinct-1 over "
             "the base's; minutes: the whole pipeline. Written by examples/verifiable/seeds.py from "
             "examples/verifiable/results/seeds.json.", "",
             "| variant | seed | problems | start accuracy (95% CI) | trained accuracy (95% CI) | gain | halfway | "
             "exact KL | length / base | distinct-1 / base | minutes | bars missed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        bars = "(compared)" if r["bars_missed"] is None else ", ".join(r["bars_missed"]) or "none"
        lines.append(
            f"| {VARIANTS[r['variant']][0]} | {r['seed']} | {r['problems']} | {r['start_accuracy']:.1%} ({r['start_ci95'][0]:.1%}-{r['start_ci95'][1]:.1%}) "
            f"| {r['accuracy']:.1%} ({r['accuracy_ci95'][0]:.1%}-{r['accuracy_ci95'][1]:.1%}) | "
            f"{100 * r['gain']:+.1f} points | {halfway(r)} | {r['kl_exact']:.2f} | {r['length_ratio']:.2f} | "
            f"{r['distinct_1_ratio']:.2f} | {r['wall_time_min']:.1f} | {bars} |")
    shipped = [r for r in results["runs"] if r["variant"] == SHIPPED]
    if len(shipped) > 1:
        def spread(key, scale=1.0, fmt="{:.1f}"):
            values = [scale * r[key] for r in shipped]
            return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"
        lines.append(f"| {VARIANTS[SHIPPED][0]}, mean ± std | | | {spread('start_accuracy', 100)}% | {spread('accuracy', 100)}% | "
                     f"{spread('gain', 100)} points | | {spread('kl_exact', fmt='{:.2f}')} | "
                     f"{spread('length_ratio', fmt='{:.2f}')} | {spread('distinct_1_ratio', fmt='{:.2f}')} | "
                     f"{spread('wall_time_min')} | |")
    return "\n".join(lines) + "\n"


def headline(results: dict) -> str:
    """The README's sentence: the shipped config over its seeds."""
    shipped = [r for r in results["runs"] if r["variant"] == SHIPPED]
    if not shipped:
        return ""
    def span(key, scale=100.0, fmt="{:.0f}"):
        values = [scale * r[key] for r in shipped]
        return f"{fmt.format(statistics.fmean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"
    met = sum(not r["bars_missed"] for r in shipped)
    return (f"Over seeds {', '.join(str(r['seed']) for r in shipped)} on {results['machine']}, 2 threads, its "
            f"held-out accuracy on {shipped[0]['problems']} problems goes from {span('start_accuracy')}% to "
            f"{span('accuracy')}%, mean (range), at an exact KL of {span('kl_exact', 1.0, '{:.1f}')} nats, in "
            f"{span('wall_time_min', 1.0, '{:.1f}')} minutes; every bar is met on {met} of {len(shipped)} seeds. "
            "Each seed's row, and GRPO beside it: "
            "[examples/verifiable/README.md](examples/verifiable/README.md).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", choices=list(VARIANTS), default=SHIPPED)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="redo the table from the finished runs")
    args = parser.parse_args()
    for seed in [] if args.table_only else args.seeds:
        if not (folder(args.variant, seed) / "eval" / "report.json").is_file():
            run(args.variant, seed, args.threads)
    finished = sorted(((variant, int(path.parent.parent.name.removeprefix("seed")))
                       for variant in VARIANTS for path in (ROOT / "runs" / "verifiable" / variant).glob("seed*/eval/report.json")),
                      key=lambda run: (list(VARIANTS).index(run[0]), run[1]))
    results = {"config": CONFIG, "machine": machine(), "threads": args.threads,
               "runs": [figures(variant, seed) for variant, seed in finished]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    RESULTS.with_suffix(".md").write_text(table)
    write_between_markers(PAGE, MARKERS, table)
    write_between_markers(README, HEADLINE, headline(results))
    print(table)


if __name__ == "__main__":
    main()
