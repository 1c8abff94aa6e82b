"""A run's output directory: resolved config, metrics, completion marker, and resource figures."""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from rlft.config import save_config

METRICS = "metrics.json"  # written last: its presence marks a finished stage


def prepare(output_dir: str, config) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    return out


def is_complete(output_dir: str | Path) -> bool:
    return (Path(output_dir) / METRICS).is_file()


def write_json(path: str | Path, data: dict) -> None:
    """Atomic write: readers (and crashes) never see half a file."""
    path = Path(path)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=float)
    os.chmod(staging, 0o644)  # mkstemp makes it owner-only; results are for everyone to read
    os.replace(staging, path)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
