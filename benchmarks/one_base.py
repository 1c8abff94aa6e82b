"""Memory and time of PPO by reward model and critic: what a reward adapter on the policy's own base costs.

    python benchmarks/one_base.py --json benchmarks/results/one_base.json
    python benchmarks/one_base.py --steps 2 --variants function adapter_head   # a quick check

Each variant is `rlft ppo` for a few steps from the quickstart's SFT adapter, in its own process (peak RSS
is the process's own `ru_maxrss`, as rlft's metrics.json records it), one after the other:

    function        the VADER judge as the reward (no reward network): the floor
    minilm          the quickstart's MiniLM-L6 reward model (a second, small network)
    adapter_head    the one-base quickstart's SmolLM2 reward adapter, scored on PPO's own base; head critic
    adapter_adapter the same reward adapter and an adapter critic started from it (four roles, one base)

Needs finished runs of configs/quickstart.yaml and configs/quickstart_one_base.yaml (their sft and reward).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLD = "{name: gold, kind: function, path: 'reward_models.judges:sentiment'}"


def variants(quickstart: Path, one_base: Path) -> dict[str, list[str]]:
    minilm = f"{{name: proxy, kind: model, path: {quickstart / 'reward'}, normalize: true}}"
    adapter = f"{{name: proxy, kind: adapter, path: {one_base / 'reward'}, normalize: true}}"
    return {
        "function": [f"reward=[{GOLD}]"],
        "minilm": [f"reward=[{minilm}]"],
        "adapter_head": [f"reward=[{adapter}]", "ppo.critic=head"],
        "adapter_adapter": [f"reward=[{adapter}]", "ppo.critic=adapter"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", default="runs/quickstart", help="finished quickstart (its sft and reward)")
    parser.add_argument("--one-base", default="runs/quickstart_one_base", help="finished one-base quickstart (reward)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["function", "minilm", "adapter_head", "adapter_adapter"])
    parser.add_argument("--out", default="runs/bench_one_base")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    quickstart, one_base, out = Path(args.quickstart), Path(args.one_base), Path(args.out)
    table = variants(quickstart, one_base)
    results = {"steps": args.steps, "threads": os.environ.get("OMP_NUM_THREADS"), "runs": {}}
    for name in args.variants:
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [sys.executable, "-m", "rlft", "ppo", "--config", "configs/ppo.yaml", f"output_dir={run_dir}",
                   f"sft_adapter={quickstart / 'sft'}", f"ppo.steps={args.steps}", f"save_every={args.steps}",
                   "model.dtype=auto",  # as the quickstart: bfloat16 on a CPU with AVX512-BF16/AMX, else float32
                   *table[name]]
        print("+", " ".join(command[2:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        summary = json.loads((run_dir / "metrics.json").read_text())
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        later = steps[1:] or steps  # the first step also pays for one-off warm-up
        results["runs"][name] = {
            "peak_rss_mb": round(summary["peak_rss_mb"], 1),
            "time_step_s": round(sum(s["time/step"] for s in later) / len(later), 2),
            "time_score_s": round(sum(s["time/score"] for s in later) / len(later), 2),
            "time_forward_s": round(sum(s["time/forward"] for s in later) / len(later), 2),
            "time_update_s": round(sum(s["time/update"] for s in later) / len(later), 2),
        }
    floor = results["runs"].get("function", {}).get("peak_rss_mb")
    print(f"\n{'variant':<16} {'peak RSS MB':>11} {'x function':>10} {'step s':>7} {'score s':>7} "
          f"{'forward s':>9} {'update s':>8}")
    for name, run in results["runs"].items():
        ratio = f"{run['peak_rss_mb'] / floor:.2f}" if floor else "-"
        run["rss_vs_function"] = float(ratio) if floor else None
        print(f"{name:<16} {run['peak_rss_mb']:>11.0f} {ratio:>10} {run['time_step_s']:>7.2f} "
              f"{run['time_score_s']:>7.2f} {run['time_forward_s']:>9.2f} {run['time_update_s']:>8.2f}")
    print(f"\n(steps after the first of {args.steps}; rerun: python benchmarks/one_base.py "
          f"--steps {args.steps} --variants {' '.join(args.variants)})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
