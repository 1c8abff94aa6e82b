"""What this CPU's matmuls give, at SmolLM2-135M's shapes: the ceiling every other benchmark is measured against.

    python benchmarks/matmul.py --json benchmarks/results/matmul.json

- `hot`: one weight multiplied again and again (it stays in cache): arithmetic throughput, GFLOP/s;
- `streamed`: every linear layer of the 30-layer model once per pass, as a decode step runs them (each weight
  comes from memory): GFLOP/s and the weight bytes read per second. Where GB/s stays flat as the rows grow,
  a decode step is bound by memory bandwidth, not arithmetic: more rows per step are nearly free.
Rows 16 and 64 are PPO's and the preferences/eval stages' decode batches; 1024 a training micro-batch's tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rlft.results import cpu

# SmolLM2-135M: hidden 576, MLP 1536, 9 query heads and 3 key/value heads of 64
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
LAYERS = 30


def seconds(function, repeats: int, rounds: int = 5) -> float:
    """The fastest of `rounds` timings of `repeats` calls (a shared VM's noise only ever slows a round)."""
    function()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            function()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[16, 64, 1024])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": cpu(), "runs": []}
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(out, inp).to(dtype) for out, inp in LAYER * LAYERS]
        weight_bytes = sum(w.numel() * w.element_size() for w in weights)
        for rows in args.rows:
            inputs = {width: torch.randn(rows, width).to(dtype) for width in (576, 1536)}
            flops = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
            streamed = seconds(lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights],
                               2 if rows > 64 else 5)
            hot_weight = weights[4]  # 576 -> 1536
            hot = seconds(lambda: torch.nn.functional.linear(inputs[576], hot_weight), 10 if rows > 64 else 100)
            run = {"dtype": str(dtype).removeprefix("torch."), "rows": rows,
                   "hot_gflops": 2 * rows * 576 * 1536 / hot / 1e9,
                   "streamed_gflops": flops / streamed / 1e9, "streamed_weight_gb_per_s": weight_bytes / streamed / 1e9,
                   "streamed_ms_per_pass": 1000 * streamed}
            results["runs"].append(run)
            print(f"{run['dtype']:>8} {rows:>5} rows: hot {run['hot_gflops']:6.0f} GFLOP/s; all 210 layers "
                  f"{run['streamed_ms_per_pass']:7.1f} ms = {run['streamed_gflops']:5.0f} GFLOP/s, "
                  f"weights read at {run['streamed_weight_gb_per_s']:5.1f} GB/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
