"""What one SFT training step adds to a process's resident memory, by batch shape: the data to calibrate
rlft/memory.py's activation model (`benchmarks/plan_memory.py` compares whole runs; this isolates one step).

    python benchmarks/activation_memory.py --case none,8,66,0.05 --case none,8,33,0.05 --case none,8,66,0 \
        --case 4bit,8,66,0.05

Each case (quantization, rows, tokens, LoRA dropout) loads the embedded SmolLM2 as `rlft sft` does
(`load_model` + `add_lora` with SFT's default LoRA section), runs a small warm-up step, then one forward and
backward on random tokens, polling RSS every 10 ms: the growth after the forward and the peak growth, in MiB.
Each case runs in its own process (the allocator keeps what a step freed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


def one(quantization: str, rows: int, tokens: int, dropout: float) -> dict:
    import psutil
    import torch

    from rlft.config import ModelConfig
    from rlft.models import add_lora, load_model
    from rlft.sft import SFTConfig

    model_config = ModelConfig(name_or_path="smollm2-135m-instruct", quantization=quantization)
    lora = SFTConfig().lora
    lora.dropout = dropout
    model = add_lora(load_model(model_config), model_config, lora)
    model.train()
    ids = torch.randint(0, 40000, (rows, tokens))
    process = psutil.Process()
    rss = lambda: process.memory_info().rss / 2**20  # noqa: E731
    warm = model(input_ids=ids[:1, :8], labels=ids[:1, :8])
    warm.loss.backward()
    model.zero_grad()
    del warm
    base, peak, done = rss(), [0.0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)
    poller = threading.Thread(target=poll)
    poller.start()
    output = model(input_ids=ids, labels=ids)
    forward = rss() - base
    output.loss.backward()
    done.set()
    poller.join()
    return {"quantization": quantization, "rows": rows, "tokens": tokens, "dropout": dropout,
            "forward_mib": forward, "peak_mib": max(peak[0], rss()) - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", required=True, help="quantization,rows,tokens,dropout")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a case, in this (child) process
    args = parser.parse_args()
    if args.one:
        quantization, rows, tokens, dropout = args.one.split(",")
        print(json.dumps(one(quantization, int(rows), int(tokens), float(dropout))))
        return
    from rlft.results import machine

    found = []
    for case in args.case:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--one", case], capture_output=True,
                             text=True, check=True).stdout
        found.append(json.loads(out.strip().splitlines()[-1]))
        row = found[-1]
        print(f"{row['quantization']:>5} {row['rows']} rows x {row['tokens']} tokens, dropout {row['dropout']}: "
              f"forward +{row['forward_mib']:.0f} MiB, peak +{row['peak_mib']:.0f} MiB", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": machine(), "cases": found}, file, indent=2)


if __name__ == "__main__":
    main()
