"""KL controllers side by side: the same PPO stage of a quickstart run under each `ppo.kl_control`.

    python benchmarks/kl_control.py --pipeline runs/quickstart --json benchmarks/results/kl_control.json
    python benchmarks/kl_control.py --pipeline runs/quickstart ppo.advantage_estimator=grpo ppo.num_generations=4

For each controller: `rlft ppo` from the pipeline's SFT adapter against its reward model (any extra
`key=value` arguments are passed on), then `rlft eval` of the final policy (proxy and gold win rates, exact
KL on the held-out prompts). Prints the per-step KL and beta of each run and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def rlft(*args: str) -> None:
    print("+ rlft", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "rlft", *args], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="runs/quickstart", help="a finished pipeline folder (sft, reward)")
    parser.add_argument("--controllers", nargs="+", default=["adaptive", "pi"], choices=["adaptive", "pi", "fixed"])
    parser.add_argument("--out", default="runs/kl_control", help="one PPO run and one report per controller here")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="extra rlft ppo overrides, e.g. ppo.advantage_estimator=grpo")
    args = parser.parse_args()
    pipeline, out = Path(args.pipeline), Path(args.out)
    proxy = f"{{name: proxy, kind: model, path: {pipeline / 'reward'}, normalize: true}}"
    results = {"pipeline": str(pipeline), "overrides": args.overrides, "threads": os.environ.get("OMP_NUM_THREADS"),
               "runs": {}}
    for controller in args.controllers:
        run_dir, eval_dir = out / controller, out / f"{controller}_eval"
        rlft("ppo", "--config", "configs/ppo.yaml", f"output_dir={run_dir}", f"sft_adapter={pipeline / 'sft'}",
             f"reward=[{proxy}]", f"ppo.kl_control={controller}", *args.overrides)
        rlft("eval", "--config", "configs/eval.yaml", f"output_dir={eval_dir}", f"policies=[{run_dir}]",
             "checkpoints_of=", f"training_run={run_dir}", "num_samples_shown=0",
             f"scorers=[{proxy}, {{name: gold, kind: function, path: 'reward_models.judges:sentiment'}}]")
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        policy = json.loads((eval_dir / "report.json").read_text())["policies"][0]
        results["runs"][controller] = {
            "target_kl": yaml.safe_load((run_dir / "config.yaml").read_text())["ppo"]["target_kl"],
            "kl": [round(s["objective/kl"], 3) for s in steps if "objective/kl" in s],
            "kl_coef": [round(s["objective/kl_coef"], 4) for s in steps if "objective/kl_coef" in s],
            "eval_kl_exact": policy["kl"]["exact"],
            "proxy_win_rate": policy["rewards"]["proxy"]["win_rate"],
            "gold_win_rate": policy["rewards"]["gold"]["win_rate"],
        }
    for controller, run in results["runs"].items():
        print(f"\n{controller} (target {run['target_kl']}): eval exact KL {run['eval_kl_exact']['mean']:.2f}, "
              f"proxy win {run['proxy_win_rate']['mean']:.0%}, gold win {run['gold_win_rate']['mean']:.0%}")
        print(" step  KL     beta")
        for step, (kl, beta) in enumerate(zip(run["kl"], run["kl_coef"]), 1):
            print(f" {step:4d}  {kl:5.2f}  {beta:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
