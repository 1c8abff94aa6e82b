"""SFT in float32 against bfloat16 on the embedded SmolLM2: `configs/sft.yaml`, same data, steps and seed.

    python benchmarks/sft_dtype.py [--out runs/bench_sft_dtype] [--json benchmarks/results/sft_dtype.json]

Runs `rlft sft --config configs/sft.yaml model.dtype=D` for D in float32, bfloat16, each in its own process
(its own peak RSS), one after the other, and reports per run: training time (the optimiser steps alone), wall
time, held-out eval loss before and after, peak RSS; then bf16's speed-up over float32 and the difference in
eval loss. bf16 only pays where the hardware multiplies it (AVX512-BF16/AMX-BF16, or a GPU): the CPU's flags
are recorded. Runs that already finished in <out> are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from rlft.results import cpu

ROOT = Path(__file__).parents[1]
DTYPES = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_sft_dtype")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    out = Path(args.out)
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu_flags": cpu()["flags"],
               "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))}
    for dtype in DTYPES:
        folder = out / dtype
        if not (folder / "metrics.json").is_file():
            subprocess.run([sys.executable, "-m", "rlft", "sft", "--config", str(ROOT / "configs" / "sft.yaml"),
                            f"output_dir={folder}", f"model.dtype={dtype}"], check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        metrics = json.loads((folder / "metrics.json").read_text())
        results[dtype] = {key: metrics[key] for key in ("eval_loss_before", "eval_loss_after", "steps", "train_rows",
                                                        "train_time_s", "wall_time_s", "peak_rss_mb")}
    fp32, bf16 = results["float32"], results["bfloat16"]
    assert fp32["steps"] == bf16["steps"], "the runs took different numbers of steps"
    results["bf16_train_speedup"] = fp32["train_time_s"] / bf16["train_time_s"]
    results["bf16_wall_speedup"] = fp32["wall_time_s"] / bf16["wall_time_s"]
    results["bf16_eval_loss_minus_fp32"] = bf16["eval_loss_after"] - fp32["eval_loss_after"]
    results["bf16_peak_rss_ratio"] = bf16["peak_rss_mb"] / fp32["peak_rss_mb"]
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
