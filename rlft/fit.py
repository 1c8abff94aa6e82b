"""Whether a planned process fits its device: the device and its memory, the settings that shrink a plan, the
verdict, and a plan as text (`rlft plan`'s output) and as JSON (`--json`). The plans themselves, and every check,
are rlft/plan.py's."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlft import memory
from rlft.errors import RlftError

if TYPE_CHECKING:
    from rlft.plan import Setting, StagePlan


@dataclass(frozen=True)
class Device:
    kind: str  # cpu or cuda: the runtime's footprint, and what model.dtype auto becomes
    bytes: float
    label: str



def device_of(spec: str | None = None) -> Device:
    """The device planned for: cpu (this machine's RAM), cuda (GPU 0's memory), or a number of GiB (a GPU of that
    size, which need not be here); by default the GPU if one is visible, else the CPU."""
    spec = spec or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return Device("cpu", ram_bytes(), f"cpu, {ram_bytes() / 2**30:.1f} GiB RAM")
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise RlftError("--device cuda: no GPU is visible here: give its memory in GiB instead, e.g. --device 80")
        gpu = torch.cuda.get_device_properties(0)
        return Device("cuda", gpu.total_memory, f"{gpu.name}, {gpu.total_memory / 2**30:.1f} GiB")
    try:
        gib = float(spec)
    except ValueError:
        gib = 0.0
    if not 0 < gib < float("inf"):
        raise RlftError(f"--device {spec}: expected cpu, cuda or a GPU's memory in GiB (e.g. --device 24)")
    return Device("cuda", gib * 2**30, f"a GPU of {gib:g} GiB")



def ram_bytes() -> float:
    """This machine's RAM: MemTotal, or the container's memory limit (cgroup v2) where that is lower."""
    try:
        total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
    except (OSError, StopIteration):  # not Linux
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total



def write_json(path: str | Path, plans: list[StagePlan], setting: Setting) -> None:
    """`rlft plan --json PATH`: per stage its problems, and where it has a memory plan, its peak and parts in MiB
    and the workload they were computed from (the numbers rlft/memory.py turns into bytes), so that a measured
    peak can be set against them (benchmarks/plan_memory.py) and the estimates recalibrated."""
    stages = []
    for plan in plans:
        entry: dict = {"stage": plan.stage, "problems": plan.problems}
        if plan.workload is not None:
            found = memory.parts(plan.workload)
            entry["peak_mib"] = memory.peak(found) / memory.MIB
            entry["parts"] = [{"key": part.key, "phase": part.phase, "mib": part.bytes / memory.MIB,
                               "label": part.label} for part in found]
            entry["workload"] = asdict(plan.workload)
        stages.append(entry)
    document = {"device": setting.device.label, "device_kind": setting.device.kind, "processes": setting.processes,
                "strategy": setting.strategy, "stages": stages}
    try:
        Path(path).write_text(json.dumps(document, indent=1) + "\n")
    except OSError as e:
        raise RlftError(f"--json {path}: cannot write it ({e.strerror or e}): give a writable path") from None



def knobs(w: memory.Workload, accumulation: int, rows_change,
          rows_per_item: int = 1) -> list[tuple[str, memory.Workload]]:
    """What to change, in the order to try it, each with the workload it gives: fewer rows per micro-batch (halved,
    with as much more gradient accumulation: the same batch; `rows_change(items, steps)` names the keys), gradient
    checkpointing, a 4-bit base, FSDP over the processes. A training stage's micro-batch rows also set the rows
    of logits its loss holds."""
    found = []
    items, steps = w.rows // rows_per_item, accumulation
    while items > 1 and items % 2 == 0:
        items, steps = items // 2, steps * 2
        rows = items * rows_per_item
        found.append((rows_change(items, steps), replace(w, rows=rows, logit_rows=rows if w.logit_rows else 0)))
    if not w.gradient_checkpointing and w.rows:
        found.append(("model.gradient_checkpointing=true", replace(w, gradient_checkpointing=True)))
    if w.packed:
        found.append(("sampling.pack_weights=false", replace(w, packed=0)))
    if w.quantization == "none" and not w.full_finetune:
        found.append(("model.quantization=4bit", replace(w, quantization="4bit", merged=0, packed=quantized_packed(w))))
    if w.processes > 1 and w.strategy == "ddp":
        found.append(("FSDP: accelerate launch --config_file configs/accelerate/fsdp.yaml",
                      replace(w, strategy="fsdp", merged=0, packed=0)))
    return found



def sampling_knobs(w: memory.Workload) -> list[tuple[str, memory.Workload]]:
    """A sampling stage's: fewer rows decoded at once (batch_size), no prepacked copy, a 4-bit base."""
    found, rows = [], w.generate_rows
    while rows > 1:
        rows //= 2
        found.append((f"batch_size={rows}", replace(w, generate_rows=rows, logit_rows=min(w.logit_rows, rows))))
    if w.packed:
        found.append(("sampling.pack_weights=false", replace(w, packed=0)))
    if w.quantization == "none":
        found.append(("model.quantization=4bit", replace(w, quantization="4bit", merged=0, packed=quantized_packed(w))))
    return found


def quantized_packed(w: memory.Workload) -> int:
    """What a 4-bit base leaves to prepack (bitsandbytes keeps the output head in the compute dtype)."""
    return w.model.vocab * w.model.hidden if w.packed else 0



def verdict(plan: StagePlan, setting: Setting) -> str:
    """fits / does not fit, against the device (on a CPU every process shares the one machine's RAM), and where it
    does not, the first knob that makes it fit, else the one that saves most."""
    shared = setting.processes if setting.device.kind == "cpu" and plan.workload.processes > 1 else 1

    def needed(workload: memory.Workload) -> float:
        return shared * memory.peak(memory.parts(workload))

    total = needed(plan.workload)
    of = f"{total / memory.MIB:,.0f} MiB" + (f" ({shared} processes)" if shared > 1 else "") + \
        f" of {setting.device.bytes / memory.MIB:,.0f} MiB ({setting.device.label})"
    if total <= setting.device.bytes:
        return f"fits: {of}"
    if not plan.knobs:
        return f"does not fit: {of}; nothing in this stage's config makes it smaller: a larger device"
    for change, workload in plan.knobs:
        if needed(workload) <= setting.device.bytes:
            return f"does not fit: {of}; first set {change} ({needed(workload) / memory.MIB:,.0f} MiB)"
    change, workload = min(plan.knobs, key=lambda knob: needed(knob[1]))
    return (f"does not fit: {of}; no one knob is enough: {change} saves the most "
            f"({needed(workload) / memory.MIB:,.0f} MiB), then a larger device or more processes under FSDP")



def render(plan: StagePlan, setting: Setting) -> str:
    """The stage's notes, its table of parts (MiB, when held) and its verdict."""
    lines = [f"[{plan.stage}]" + (f" {setting.processes} processes, {setting.strategy}"
                                   if plan.workload and plan.workload.processes > 1 else "")]
    lines += [f"  {note}" for note in plan.notes]
    if plan.workload is None:
        if plan.problems:
            lines.append("  no memory plan: see the problems below")
        return "\n".join(lines)
    found = memory.parts(plan.workload)
    width = max(len(part.label) for part in found) + 2
    lines.append(f"  {'part':<{width}}{'held':<10}{'MiB':>9}")
    for part in found:
        lines.append(f"  {part.label:<{width}}{part.phase:<10}{part.bytes / memory.MIB:>9,.0f}")
    lines.append(f"  {'peak: always + the larger of forward and generate':<{width + 10}}"
                 f"{memory.peak(found) / memory.MIB:>9,.0f}")
    lines.append(f"  {verdict(plan, setting)}")
    return "\n".join(lines)
