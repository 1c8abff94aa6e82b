"""What the scripts that write rlft's result tables share (examples/*/ and benchmarks/): the machine the figures
came from, and a generated block put in place in a page between its markers."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from rlft.config import ModelConfig
from rlft.models import torch_dtype


def cpu() -> dict:
    """The CPU the figures ran on: bf16 matmuls are only fast with AVX512-BF16 or AMX (or a GPU)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    return {"cpu": model, "cores": os.cpu_count(), "bf16_instructions": sorted(flags & {"avx512_bf16", "amx_bf16"}),
            "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})}


def machine() -> str:
    """One line: the CPU model, the vector ISA torch dispatches to (one CPU model name covers machines that differ
    there), the torch build, and what model.dtype auto resolves to here: another machine's floating point differs."""
    auto = str(torch_dtype(ModelConfig(), "cpu")).removeprefix("torch.")
    return (f"{cpu()['cpu']} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}), "
            f"torch {torch.__version__}, model.dtype auto = {auto}")


def write_between_markers(path: Path, markers: tuple[str, str], text: str) -> None:
    """Replace what stands between the two marker lines of `path` (left alone if they are missing)."""
    content = path.read_text()
    start, end = markers
    if start in content and end in content:
        path.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}{end}", content,
                               flags=re.S))
