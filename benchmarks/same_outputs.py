"""Whether two pipeline folders hold the same results, bit for bit: the check that a refactor changed nothing.

    python benchmarks/same_outputs.py runs/before runs/after   # e.g. the quickstart at one seed, dtype, thread count

Compares every weight file (.safetensors, tensor by tensor), the preference pairs, the reward model's
normalisation, every per-step figure PPO logged (but times), PPO's result and its checkpoints' KL, and every
number and sample of the report (but times and paths). Prints each difference and exits 1 if there is one.
Run both pipelines on the same machine, seed, dtype and thread count: another CPU samples other tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

# what differs between two runs of the same computation: times, memory, and where each run's folders are
IGNORED_KEYS = ("wall_time_s", "train_time_s", "peak_rss_mb", "path", "run", "files", "folder", "reference_adapter")
IGNORED_PARTS = ("time/", "perf/")  # per-step timings, also as summaries ("mean/time/step")


def ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key == "time" or any(part in key for part in IGNORED_PARTS)


def differences(a, b, where: str) -> list[str]:
    """Where two JSON values differ, times and paths left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [d for key in keys if not ignored(str(key))
                for d in differences(a.get(key), b.get(key), f"{where}.{key}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} against {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:80]} != {str(b)[:80]}"]


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(before: Path, after: Path) -> list[str]:
    found = []
    weights = sorted(p.relative_to(before) for p in before.rglob("*.safetensors"))
    if not weights:
        found.append(f"{before}: no weight files")
    for name in weights:
        if not (after / name).is_file():
            found.append(f"{name}: missing in {after}")
            continue
        x, y = load_file(before / name), load_file(after / name)
        found += [f"{name}: {key} differs" for key in sorted(set(x) | set(y))
                  if key not in x or key not in y or not (x[key] == y[key]).all()]
    for name in ("preferences/pairs.jsonl", "ppo/metrics.jsonl", "ppo/samples.jsonl"):
        found += differences(jsonl(before / name), jsonl(after / name), name)
    for name in ("reward/normalization.json", "sft/metrics.json", "reward/metrics.json", "ppo/metrics.json",
                 "eval/report.json"):
        found += differences(json.loads((before / name).read_text()), json.loads((after / name).read_text()), name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    found = compare(args.before, args.after)
    print("\n".join(found) if found else f"{args.before} and {args.after} hold the same results")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
