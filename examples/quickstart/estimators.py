"""The quickstart's policy trained by each estimator, PPO (critic + GAE), GRPO and RLOO, in one report.

    python examples/quickstart/estimators.py

1. `rlft pipeline --config configs/quickstart.yaml`: SFT, preference pairs, reward model, PPO, report;
2. `configs/quickstart_grpo.yaml` (Dr. GRPO), `quickstart_rloo.yaml` and `quickstart_grpo_std.yaml` (GRPO
   divided by the group std): the PPO stage only, with another advantage estimator, on the quickstart's
   own SFT and reward models (`reuse_from`);
3. `rlft eval --config configs/eval_estimators.yaml`: the four policies on the same held-out prompts,
   proxy and gold, in runs/estimators/report.html;
4. the headline table from that report.json into examples/quickstart/estimators.{json,md}, and into the
   README between its `<!-- estimators -->` markers.
Each training stage skips what is already complete, so a rerun redoes the reports and the table;
`--table-only` redoes the table alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMMANDS = [
    ["pipeline", "--config", "configs/quickstart.yaml"],
    ["pipeline", "--config", "configs/quickstart_grpo.yaml", "stages=[sft,preferences,reward,ppo]"],
    ["pipeline", "--config", "configs/quickstart_rloo.yaml", "stages=[sft,preferences,reward,ppo]"],
    ["pipeline", "--config", "configs/quickstart_grpo_std.yaml", "stages=[sft,preferences,reward,ppo]"],
    ["eval", "--config", "configs/eval_estimators.yaml"],
]
REPORT = ROOT / "runs" / "estimators" / "report.json"
README = ROOT / "README.md"
MARKERS = ("<!-- estimators: written by examples/quickstart/estimators.py -->", "<!-- /estimators -->")
RUNS = {"ppo": "runs/quickstart/ppo", "grpo (Dr. GRPO)": "runs/quickstart_grpo/ppo", "rloo": "runs/quickstart_rloo/ppo",
        "grpo, std-scaled": "runs/quickstart_grpo_std/ppo"}


def main() -> None:
    if "--table-only" not in sys.argv[1:]:  # --table-only: rewrite the table from the existing report
        run_all()
    write_table()


def run_all() -> None:
    for command in COMMANDS:
        print("+ rlft", " ".join(command), flush=True)
        subprocess.run([sys.executable, "-m", "rlft", *command], cwd=ROOT, check=True)


def write_table() -> None:
    table = headline(json.loads(REPORT.read_text()))
    (HERE / "estimators.json").write_text(json.dumps(table, indent=2) + "\n")
    (HERE / "estimators.md").write_text(markdown(table))
    write_between_markers(README, MARKERS, markdown(table))
    print(markdown(table))


def write_between_markers(path: Path, markers: tuple[str, str], text: str) -> None:
    """Replace what stands between the two marker lines of `path` (left alone if they are missing)."""
    content = path.read_text()
    start, end = markers
    if start in content and end in content:
        path.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}{end}", content,
                               flags=re.S))


def ci(stats: dict, percent: bool = False) -> str:
    """'mean ± half-width' of a {mean, ci95} summary."""
    half = stats["mean"] - stats["ci95"][0]
    return f"{stats['mean']:.0%} ± {half:.0%}" if percent else f"{stats['mean']:.2f} ± {half:.2f}"


def headline(report: dict) -> dict:
    """Per policy: win rates over its reference (proxy, gold), exact KL, length, and its run's cost."""
    rows = []
    for policy in report["policies"]:
        run = next((name for name, path in RUNS.items() if policy["path"].startswith(path)), None)
        if run is None:
            continue  # the SFT policy: its reference is the base model, not the SFT model
        rewards = policy["rewards"]
        rows.append({
            "estimator": run,
            "proxy_win_rate": rewards[report["proxy"]]["win_rate"],
            "gold_win_rate": rewards[report["gold"]]["win_rate"],
            "kl_exact": policy["kl"]["exact"],
            "target_kl": yaml.safe_load((ROOT / RUNS[run] / "config.yaml").read_text())["ppo"]["target_kl"],
            "length": policy["response"]["policy"]["length"]["mean"],
            "reference_length": policy["response"]["reference"]["length"]["mean"],
        })
    reward = json.loads((ROOT / "runs" / "quickstart" / "reward" / "metrics.json").read_text())
    return {"prompts": report["prompts"]["count"], "seed": report["seed"],
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count(),
            "reward_model": {"accuracy_before": reward["eval_accuracy_before"],
                             "accuracy_after": reward["eval_accuracy_after"], "eval_pairs": reward["eval_rows"]},
            "rows": rows}


def markdown(table: dict) -> str:
    rm = table["reward_model"]
    lines = [f"Each policy against the SFT model it started from, on {table['prompts']} held-out prompts (win rates and "
             f"means ± 95% CI half-widths); seed {table['seed']}, {table['threads']} threads. Reward model held-out "
             f"accuracy {rm['accuracy_before']:.2f} before training, {rm['accuracy_after']:.2f} after "
             f"({rm['eval_pairs']} pairs). Speed is measured in benchmarks/, not here. Written by "
             "examples/quickstart/estimators.py from runs/estimators/report.json.", "",
             "| Estimator | Proxy win rate | Gold win rate | Exact KL (target) | Length (policy / SFT) |",
             "|---|---|---|---|---|"]
    for row in table["rows"]:
        lines.append(f"| {row['estimator']} | {ci(row['proxy_win_rate'], True)} | {ci(row['gold_win_rate'], True)} | "
                     f"{ci(row['kl_exact'])} ({row['target_kl']:g}) | {row['length']:.1f} / {row['reference_length']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
