"""A run's output directory: one run at a time, its resolved config, metrics, completion marker, resources."""

from __future__ import annotations

import fcntl
import json
import os
import random
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from rlft.config import to_dict
from rlft.distributed import is_main_process
from rlft.errors import RlftError

METRICS = "metrics.json"  # written last: its presence marks a finished stage
CONFIG = "config.yaml"
LOCK = ".rlft-lock"
_locks: dict[Path, int] = {}  # folder -> open, flock'ed lock file; the kernel releases it when the process dies


def prepare(output_dir: str | Path, config, resuming: bool = False, may_change: tuple[str, ...] = ()) -> Path:
    """Claim `output_dir` for this run: create it, lock it against a second run, save the resolved config.

    When `resuming` a checkpoint there, the saved config must equal this one but for the `may_change`
    keys (run length, logging cadence): a changed `lora.r` or learning rate would mix two experiments in
    one folder, or crash on the checkpoint's shapes. The check comes before the saved config is replaced.
    """
    out = Path(output_dir)
    if not is_main_process():
        return out  # under `accelerate launch` the main process alone claims the folder and writes its files
    if out.exists() and not out.is_dir():
        raise RlftError(f"output_dir '{out}' is a file, not a folder: pick another output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock(out)
    except OSError as e:
        raise RlftError(f"cannot write to output_dir '{out}' ({e.strerror or e}): pick a writable folder") from None
    if resuming:
        changed = saved_config_changes(out, config, may_change)
        if changed:
            raise RlftError(
                f"output_dir '{out}' holds a checkpoint of a run with another config ({'; '.join(changed)}): "
                "rerun with the saved values, set resume=false to start over there, or pick another output_dir"
            )
    save_config(config, out / CONFIG)
    return out


def lock(out: Path) -> None:
    """Hold `out/.rlft-lock` for the rest of this process; another live process holding it is refused."""
    key = out.resolve()
    if key in _locks:
        return  # this process already runs here (a pipeline, or a test calling stages in turn)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RlftError(f"output_dir '{out}' is in use by another run ({holder}): wait for it to finish, "
                        "or pick another output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    _locks[key] = fd


def release_locks() -> None:
    """Let the output folders go (a CLI command ending; a dying process releases them anyway)."""
    for fd in _locks.values():
        os.close(fd)
    _locks.clear()


def saved_config_changes(folder: str | Path, config, may_change: tuple[str, ...] = ()) -> list[str]:
    """'key: saved -> current' for every leaf where `config` differs from the one saved in `folder`, outside
    `may_change` (dotted keys or sections). A key only one side has is an option added or removed between
    rlft versions, not a change of the run: skipped. No saved config: no changes."""
    saved = Path(folder) / CONFIG
    old = flatten(yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else {}
    new = flatten(to_dict(config))
    allowed = lambda key: any(key == k or key.startswith(k + ".") for k in may_change)  # noqa: E731
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(old.keys() & new.keys())
            if old[key] != new[key] and not allowed(key)]


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_complete(output_dir: str | Path) -> bool:
    return (Path(output_dir) / METRICS).is_file()


def save_config(config, path: str | Path) -> None:
    """The fully resolved config next to a run's outputs, so the run can be reproduced."""
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=float))


def write_text(path: str | Path, text: str) -> None:
    """Atomic write: readers (and crashes) never see half a file."""
    path = Path(path)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(staging, 0o644)  # mkstemp makes it owner-only; results are for everyone to read
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)  # a full disk leaves no stray staging file behind
        raise


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def unsafe_checkpoint(folder, error: Exception) -> RlftError:
    """What a user sees when torch.load(weights_only=True) refuses a checkpoint file: it holds code."""
    return RlftError(
        f"checkpoint '{folder}' holds objects other than tensors and numbers, refused unread "
        f"({str(error).splitlines()[0][:120]}): it was not written by rlft; delete it, or set resume=false"
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
