"""Memory per process of 2-process PPO on the embedded SmolLM2: DDP (whole base in each) against FSDP2 FULL_SHARD,
generating layer by layer (the default) or on the whole gathered policy (ppo.gather_for_generation).

    python benchmarks/fsdp_memory.py --json benchmarks/results/fsdp_memory.json

Each variant is `accelerate launch --config_file configs/accelerate/<ddp_cpu|fsdp>.yaml -m rlft ppo` for a
few steps from the quickstart's SFT adapter against the VADER judge (no reward network), one after the
other, each process on one thread. Read from each run's metrics.json:

    parameters_mb   parameter + buffer storage one process holds after setup (its shards under FSDP),
                    counted tensor by tensor (the largest of the processes)
    peak_rss_mb     the main process's peak resident memory (ru_maxrss): loading the whole base before
                    sharding it is part of it
and the mean step time after the first step. The table also goes into README.md between its
<!-- fsdp_memory --> markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rlft.results import write_between_markers

ROOT = Path(__file__).resolve().parents[1]

MARKERS = ("<!-- fsdp_memory -->", "<!-- /fsdp_memory -->")
GOLD = "{name: gold, kind: function, path: 'reward_models.judges:sentiment'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", default="runs/quickstart", help="finished quickstart (its sft adapter)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_fsdp")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--table-only", action="store_true", help="only rewrite README's table from --json")
    args = parser.parse_args()
    if args.table_only:
        return write_between_markers(ROOT / "README.md", MARKERS, markdown(json.loads(Path(args.json).read_text()),
                                                                          args.json))
    results = {"steps": args.steps, "processes": args.processes, "threads_per_process": 1, "runs": {}}
    variants = {"ddp_cpu": ("ddp_cpu", []), "fsdp": ("fsdp", []),
                "fsdp_whole": ("fsdp", ["ppo.gather_for_generation=true"])}
    for name, (launch_config, overrides) in variants.items():
        run_dir = Path(args.out) / name
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   f"configs/accelerate/{launch_config}.yaml", "--num_processes", str(args.processes), "-m", "rlft",
                   "ppo", "--config", "configs/ppo.yaml", f"output_dir={run_dir}",
                   f"sft_adapter={Path(args.quickstart) / 'sft'}", f"ppo.steps={args.steps}", f"save_every={args.steps}",
                   f"reward=[{GOLD}]", *overrides]
        print("+", " ".join(command[2:]), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(command, check=True, cwd=ROOT, env=env)
        summary = json.loads((run_dir / "metrics.json").read_text())
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results["runs"][name] = {
            "parameters_mb": summary["parameters_mb"],
            "peak_rss_mb": summary["peak_rss_mb"],
            "step_time_s": sum(s["time/step"] for s in steps[1:]) / max(len(steps) - 1, 1),
            "generate_s": sum(s["time/generate"] for s in steps[1:]) / max(len(steps) - 1, 1),
            "first_kl": steps[0]["objective/kl"],
        }
    ddp, fsdp = results["runs"]["ddp_cpu"], results["runs"]["fsdp"]
    results["parameters_ratio"] = fsdp["parameters_mb"] / ddp["parameters_mb"]
    results["peak_rss_ratio"] = fsdp["peak_rss_mb"] / ddp["peak_rss_mb"]
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        write_between_markers(ROOT / "README.md", MARKERS, markdown(results, args.json))


def markdown(results: dict, source: str) -> str:
    rows = [f"{results['processes']} processes x 1 thread, {results['steps']} PPO steps of the embedded SmolLM2 "
            f"(`benchmarks/fsdp_memory.py`, {source}):", "",
            "| Launch config | Parameters per process | Peak RSS (main process) | Step time | Generate |",
            "|---|---|---|---|---|"]
    labels = {"ddp_cpu": "`ddp_cpu.yaml`", "fsdp": "`fsdp.yaml`, layer by layer",
              "fsdp_whole": "`fsdp.yaml`, `ppo.gather_for_generation=true`"}
    for name, run in results["runs"].items():
        rows.append(f"| {labels.get(name, name)} | {run['parameters_mb']:.0f} MB | {run['peak_rss_mb']:.0f} MB | "
                    f"{run['step_time_s']:.1f} s | {run['generate_s']:.1f} s |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
