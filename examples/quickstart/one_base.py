"""The quickstart with one base for all four roles, next to the MiniLM quickstart, with both critics.

    python examples/quickstart/one_base.py

1. `rlft pipeline --config configs/quickstart.yaml` (if not yet complete): MiniLM reward model, head critic;
2. `configs/quickstart_one_base.yaml`: the reward model is a SmolLM2 LoRA adapter on the quickstart's SFT
   model, PPO scores with it on its own base and trains an adapter critic started from it;
3. `configs/quickstart_one_base_head.yaml`: the same reward adapter, PPO with the head critic;
4. `benchmarks/one_base.py`: peak RSS and step time of a few PPO steps by reward model and critic;
5. the reward adapter on seeds 1 and 2 too (its reward stage only, on the SFT models and pairs of
   `examples/quickstart/seed_sweep.py`'s runs, which must be there): held-out accuracy by seed, next to MiniLM's;
6. the tables from the three reports (each pipeline's own `eval/report.json`: its own proxy, VADER as gold)
   into examples/quickstart/one_base.{json,md} and the README between its `<!-- one_base -->` markers.
Each stage skips what is already complete; `--table-only` redoes the table from what is there.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from estimators import ci, write_between_markers  # this folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
README = ROOT / "README.md"
MARKERS = ("<!-- one_base: written by examples/quickstart/one_base.py -->", "<!-- /one_base -->")
RUNS = {  # label: pipeline folder
    "MiniLM reward model, head critic": "runs/quickstart",
    "SmolLM2 reward adapter, adapter critic": "runs/quickstart_one_base",
    "SmolLM2 reward adapter, head critic": "runs/quickstart_one_base_head",
}
BENCHMARK = ROOT / "benchmarks" / "results" / "one_base.json"
COMMANDS = [
    ["-m", "rlft", "pipeline", "--config", "configs/quickstart.yaml"],
    ["-m", "rlft", "pipeline", "--config", "configs/quickstart_one_base.yaml"],
    ["-m", "rlft", "pipeline", "--config", "configs/quickstart_one_base_head.yaml"],
    ["benchmarks/one_base.py", "--json", str(BENCHMARK)],
]
SEEDS = {  # seed: (the MiniLM quickstart whose SFT model and pairs the reward adapter trains on, its folder)
    0: ("runs/quickstart", "runs/quickstart_one_base"),
    1: ("runs/seed_sweep/seed1_threads2", "runs/one_base_seeds/seed1"),
    2: ("runs/seed_sweep/seed2_threads2", "runs/one_base_seeds/seed2"),
}
COMMANDS += [["-m", "rlft", "pipeline", "--config", "configs/quickstart_one_base.yaml", f"output_dir={folder}",
              f"reuse_from={minilm}", f"seed={seed}", "stages=[sft,preferences,reward]"]
             for seed, (minilm, folder) in SEEDS.items() if seed]


def main() -> None:
    missing = [minilm for seed, (minilm, _) in SEEDS.items()  # seed 0's is the first command's
               if seed and not (ROOT / minilm / "reward" / "metrics.json").is_file()]
    if missing:
        print(f"no finished reward stage in {', '.join(missing)}: run examples/quickstart/seed_sweep.py first",
              file=sys.stderr)
        sys.exit(2)
    if "--table-only" not in sys.argv[1:]:
        for command in COMMANDS:
            print("+", " ".join(command), flush=True)
            subprocess.run([sys.executable, *command], cwd=ROOT, check=True)
    table = headline()
    (HERE / "one_base.json").write_text(json.dumps(table, indent=2) + "\n")
    (HERE / "one_base.md").write_text(markdown(table))
    write_between_markers(README, MARKERS, markdown(table))
    print(markdown(table))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def headline() -> dict:
    rows = []
    for label, relative in RUNS.items():
        folder = ROOT / relative
        report = json.loads((folder / "eval" / "report.json").read_text())
        ppo = next(p for p in report["policies"] if p["path"].startswith(f"{relative}/ppo"))
        reward = json.loads((folder / "reward" / "metrics.json").read_text()) if (folder / "reward").is_dir() else None
        if reward is None:  # reused: read the reward model this pipeline's PPO stage scored with
            ppo_config = yaml.safe_load((folder / "ppo" / "config.yaml").read_text())
            reward = json.loads((Path(ppo_config["reward"][0]["path"]) / "metrics.json").read_text())
        steps = [json.loads(line) for line in (folder / "ppo" / "metrics.jsonl").read_text().splitlines() if line]
        last = steps[len(steps) // 2:]  # the second half of training
        rows.append({
            "run": label, "folder": relative,
            "reward_accuracy": reward["eval_accuracy_after"], "reward_eval_pairs": reward["eval_rows"],
            "proxy_win_rate": ppo["rewards"][report["proxy"]]["win_rate"],
            "gold_win_rate": ppo["rewards"][report["gold"]]["win_rate"],
            "kl_exact": ppo["kl"]["exact"],
            "explained_variance": mean([s["val/explained_variance"] for s in last]),
            "time_step_s": mean([s["time/step"] for s in steps[1:]]),
        })
    benchmark = json.loads(BENCHMARK.read_text()) if BENCHMARK.is_file() else None
    return {"prompts": report["prompts"]["count"], "seed": report["seed"],
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count(), "rows": rows,
            "memory_benchmark": benchmark, "reward_by_seed": reward_by_seed()}


def reward_by_seed() -> dict:
    """Held-out accuracy of the SmolLM2 reward adapter and of MiniLM, trained on the same pairs, by seed."""
    runs = {}
    for seed, (minilm, folder) in SEEDS.items():
        adapter, baseline = (json.loads((ROOT / f / "reward" / "metrics.json").read_text()) for f in (folder, minilm))
        runs[seed] = {"adapter": adapter["eval_accuracy_after"], "minilm": baseline["eval_accuracy_after"],
                      "pairs": adapter["eval_rows"]}
    summary = {name: {"mean": statistics.mean(r[name] for r in runs.values()),
                      "std": statistics.stdev(r[name] for r in runs.values())} for name in ("adapter", "minilm")}
    return {"runs": runs, **summary}


def markdown(table: dict) -> str:
    lines = [f"PPO against the SFT model it started from, on {table['prompts']} held-out prompts (win rates and means "
             f"± 95% CI half-widths); proxy: each run's own reward model, gold: VADER; seed {table['seed']}, "
             f"{table['threads']} threads, one run each. Explained variance: mean over the second half of training; step time: mean after the first step. "
             "Written by examples/quickstart/one_base.py.", "",
             "| Run | Reward model accuracy (pairs) | Proxy win rate | Gold win rate | Exact KL | Explained variance "
             "| Step time |", "|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        lines.append(f"| {row['run']} | {row['reward_accuracy']:.2f} ({row['reward_eval_pairs']}) | "
                     f"{ci(row['proxy_win_rate'], True)} | {ci(row['gold_win_rate'], True)} | {ci(row['kl_exact'])} | "
                     f"{row['explained_variance']:.2f} | {row['time_step_s']:.1f} s |")
    by_seed = table["reward_by_seed"]
    seeds = list(by_seed["runs"])
    lines += ["", f"Held-out accuracy of the reward model by seed (seeds {', '.join(map(str, seeds))}; each seed has its "
              "own SFT model, pairs and hold-out split; both models trained on the same pairs):", "",
              "| Reward model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for name, label in (("adapter", "SmolLM2 reward adapter"), ("minilm", "MiniLM")):
        cells = " | ".join(f"{run[name]:.3f} ({run['pairs']})" for run in by_seed["runs"].values())
        lines.append(f"| {label} | {cells} | {by_seed[name]['mean']:.3f} ± {by_seed[name]['std']:.3f} |")
    benchmark = table["memory_benchmark"]
    if benchmark:
        lines += ["", f"Peak RSS of {benchmark['steps']} PPO steps by reward model (`benchmarks/one_base.py`, "
                  "each in its own process; the ratio is to a Python-function reward, no reward network):", "",
                  "| Reward model, critic | Peak RSS | vs function reward | Step time |", "|---|---|---|---|"]
        names = {"function": "VADER function, head", "minilm": "MiniLM (second network), head",
                 "adapter_head": "SmolLM2 adapter on PPO's base, head",
                 "adapter_adapter": "SmolLM2 adapter on PPO's base, adapter critic"}
        for name, run in benchmark["runs"].items():
            lines.append(f"| {names.get(name, name)} | {run['peak_rss_mb']:.0f} MB | {run['rss_vs_function']:.2f}x | "
                         f"{run['time_step_s']:.1f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
