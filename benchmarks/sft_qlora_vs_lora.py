"""QLoRA (4-bit NF4 base) against LoRA (fp32 base) SFT on the embedded SmolLM2, same data, steps and learning rate.

    python benchmarks/sft_qlora_vs_lora.py [--out runs/bench_qlora]

Runs `configs/sft.yaml` and `configs/sft_qlora.yaml` (which differ only in model.quantization and
output_dir) one after the other and writes <out>/comparison.json: each run's held-out eval loss before
and after, its drop, wall time and peak RSS, and QLoRA's drop as a share of LoRA's. Runs that already
finished in <out> are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_qlora")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for name, config in (("lora", "configs/sft.yaml"), ("qlora", "configs/sft_qlora.yaml")):
        folder = out / name
        if not (folder / "metrics.json").is_file():  # one process per run: each gets its own peak RSS
            subprocess.run([sys.executable, "-m", "rlft", "sft", "--config", str(ROOT / config),
                            f"output_dir={folder}"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        metrics = json.loads((folder / "metrics.json").read_text())
        results[name] = {key: metrics[key] for key in ("eval_loss_before", "eval_loss_after", "steps", "train_rows",
                                                       "eval_rows", "wall_time_s", "peak_rss_mb")}
        results[name]["drop"] = metrics["eval_loss_before"] - metrics["eval_loss_after"]
    results["qlora_drop_share_of_lora"] = results["qlora"]["drop"] / results["lora"]["drop"]
    results["threads"] = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
