"""A run's output directory: one run at a time, its resolved config, metrics, completion marker, resources."""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import random
import resource
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
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
STAGE_FILE = ".rlft-stage"  # which stage's run a folder holds (sft, reward, preferences, ppo, eval, pipeline)
_locks: dict[Path, int] = {}  # folder -> open, flock'ed lock file; the kernel releases it when the process dies


def prepare(output_dir: str | Path, config, stage: str, resuming: bool = False,
            may_change: tuple[str, ...] = ()) -> Path:
    """Claim `output_dir` for this run of `stage`: create it and lock it against a second run. Nothing in it
    changes until the run calls `begin`.

    A folder belongs to the stage that first claimed it (STAGE_FILE): another stage's run there, or in a folder
    inside another stage's run, is refused, so no command can overwrite another's results. When `resuming` a
    checkpoint there, the saved config must equal this one but for the `may_change` keys (run length, logging
    cadence): a changed `lora.r` or learning rate would mix two experiments in one folder, or crash on the
    checkpoint's shapes. The checks come before anything in the folder is touched.
    """
    out = folder_of(output_dir)
    if not is_main_process():
        return out  # under `accelerate launch` the main process alone claims the folder and writes its files
    check_output_dir(out, stage)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock(out)
        if not (out / STAGE_FILE).is_file():
            write_text(out / STAGE_FILE, stage + "\n")
    except OSError as e:
        raise RlftError(f"cannot write to output_dir '{out}' ({e.strerror or e}): pick a writable folder") from None
    if resuming:
        # a stage of a pipeline folder that moved whole: its saved paths to the other stages moved with it
        changed = saved_config_changes(out, config, may_change, moved=claim_of(out.parent) == "pipeline")
        if changed:
            raise RlftError(
                f"output_dir '{out}' holds a checkpoint of a run with another config ({'; '.join(changed)}): "
                "rerun with the saved values, set resume=false to start over there, or pick another output_dir"
            )
    return out


DATA_FILE = "data_fingerprint.json"  # what a run trained on, so a rerun cannot resume on other data


def check_data(output_dir: str | Path, source: str, *splits, resuming: bool) -> dict:
    """A hash of the rows a run uses (`begin` records it); a resumed run on other rows than its checkpoint's (the
    file replaced, another hold-out) is refused in one line, before it mixes two datasets in one run."""
    digest = hashlib.sha256()
    rows = 0
    for split in splits:
        for row in split:
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
            rows += 1
    found = {"source": source, "rows": rows, "sha256": digest.hexdigest()}
    path = Path(output_dir) / DATA_FILE
    if resuming and path.is_file():
        saved = read_json(path, "delete it to resume on the data at hand anyway, or set resume=false")
        if saved.get("sha256") != found["sha256"]:
            raise RlftError(f"the data changed since this run started ('{saved.get('source')}': {saved.get('rows')} rows "
                            f"then, '{source}': {rows} rows now, other contents): resume on the same data, set "
                            "resume=false to start over, or pick another output_dir")
    return found


def begin(output_dir: str | Path, config, data: dict | None = None) -> None:
    """The run starts writing in its folder: a finished run's completion mark there goes first (a kill or a full
    disk mid-save then leaves a run to resume, never a finished-looking one beside torn files), then its resolved
    config and its data's fingerprint (`check_data`) are saved. Until this call a run that fails, on bad input
    found late, has changed nothing in the folder."""
    if not is_main_process():
        return
    out = Path(output_dir)
    (out / METRICS).unlink(missing_ok=True)
    save_config(config, out / CONFIG)
    if data is not None:
        write_json(out / DATA_FILE, data)


def folder_of(output_dir: str | Path) -> Path:
    if not str(output_dir).strip():
        raise RlftError("output_dir is empty: name a folder for the run's files (e.g. output_dir=runs/my_run)")
    return Path(output_dir)


def check_output_dir(output_dir: str | Path, stage: str) -> Path:
    """What `prepare` checks before it writes, writing nothing (`rlft plan` calls it alone): a folder, no other
    stage's run, and writable (where it does not exist yet: the nearest folder above it that does)."""
    out = folder_of(output_dir)
    if out.exists() and not out.is_dir():
        raise RlftError(f"output_dir '{out}' is a file, not a folder: pick another output_dir")
    check_claim(out, stage)
    nearest = next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    if not nearest.is_dir():
        problem = f"Not a directory: '{nearest}'"
    elif os.statvfs(nearest).f_flag & os.ST_RDONLY:
        problem = "Read-only file system"
    elif not os.access(nearest, os.W_OK | os.X_OK):  # root passes, as it passes mkdir
        problem = f"Permission denied: '{nearest}'"
    else:
        return out
    raise RlftError(f"cannot write to output_dir '{out}' ({problem}): pick a writable folder")


def check_claim(out: Path, stage: str) -> None:
    """Refuse `out` when another stage's run holds it, or when it lies inside a stage's run (a pipeline's folder
    holds its stages' runs, so only a pipeline may have others inside it)."""
    claimed = claim_of(out)
    if claimed is not None and claimed != stage:
        raise RlftError(f"output_dir '{out}' holds an `rlft {claimed}` run, which `rlft {stage}` may not overwrite: "
                        "pick another output_dir (a folder belongs to the stage that made it)")
    for parent in out.resolve().parents:
        holder = claim_of(parent)
        if holder is not None and holder != "pipeline":
            raise RlftError(f"output_dir '{out}' is inside the `rlft {holder}` run '{parent}': pick a folder outside "
                            "it, so this run cannot overwrite that one's files")


def claim_of(folder: Path) -> str | None:
    """The stage whose run claimed `folder`, or None."""
    marker = folder / STAGE_FILE
    try:
        return marker.read_text().strip() or None if marker.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


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


def saved_config_changes(folder: str | Path, config, may_change: tuple[str, ...] = (), moved: bool = False) -> list[str]:
    """'key: saved -> current' for every leaf where `config` differs from the one saved in `folder`, outside
    `may_change` (dotted keys or sections; `*` stands for a list index, as in reward.*.timeout). A key only one
    side has is an option added or removed between rlft versions, not a change of the run: skipped. No saved
    config: no changes. `moved`: the folder's parent may have moved (a pipeline folder renamed or copied whole):
    paths the saved config has under its old parent count as the same paths under the new one."""
    saved = read_config(Path(folder) / CONFIG)
    current = to_dict(config)
    if moved and isinstance(saved.get("output_dir"), str):
        saved = rebase(saved, str(Path(saved["output_dir"]).parent), str(Path(current["output_dir"]).parent))
    old, new = flatten(saved), flatten(current)
    allowed = lambda key: any(fnmatch.fnmatchcase(key, k) or key.startswith(k + ".") for k in may_change)  # noqa: E731
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(old.keys() & new.keys())
            if old[key] != new[key] and not allowed(key)]


def read_config(path: Path) -> dict:
    """A run's saved config.yaml as a mapping ({} if there is none); a damaged one is one line."""
    if not path.is_file():
        return {}
    fix = "restore it (it must be the run's own resolved config), or set resume=false or pick another output_dir"
    with reading(path, fix):
        data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise RlftError(f"'{path}' is damaged (a YAML {type(data).__name__}, not a mapping): {fix}")
    return data


def rebase(value, old_root: str, new_root: str):
    """`value` (a config tree) with every string path under `old_root` moved under `new_root`."""
    if isinstance(value, dict):
        return {key: rebase(item, old_root, new_root) for key, item in value.items()}
    if isinstance(value, list):
        return [rebase(item, old_root, new_root) for item in value]
    if isinstance(value, str) and (value == old_root or value.startswith(old_root.rstrip("/") + "/")):
        return new_root + value[len(old_root):]
    return value


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif value and isinstance(value, list) and all(isinstance(item, dict) for item in value):
            # a list of sections (scorers) item by item, so an option added to them is skipped like any other
            flat[f"{prefix}{key}"] = len(value)
            for index, item in enumerate(value):
                flat.update(flatten(item, f"{prefix}{key}.{index}."))
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


def read_json(path: str | Path, fix: str = "delete it and rerun the stage that wrote it") -> dict:
    """A JSON object rlft wrote; a damaged one (cut short, edited, another format) is one line naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RlftError(f"'{path}' is damaged ({type(e).__name__}: {str(e)[:120]}): {fix}") from None
    if not isinstance(data, dict):
        raise RlftError(f"'{path}' is damaged (a JSON {type(data).__name__}, not an object): {fix}")
    return data


@contextmanager
def reading(what: str | Path, fix: str):
    """Errors from parsing files rlft wrote itself (weights cut short, JSON or YAML edited, a torn torch zip)
    become one line naming `what` was being read and how to recover."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, yaml.YAMLError, EOFError) as e:
        raise RlftError(f"'{what}' is damaged ({type(e).__name__}: {one_line(e, 120)}): {fix}") from None
    except RuntimeError as e:  # torch.load of a torn file: "PytorchStreamReader failed reading zip archive ..."
        if "PytorchStreamReader" not in str(e) and "zip archive" not in str(e):
            raise
        raise RlftError(f"'{what}' is damaged (a torch file cut short: {one_line(e, 100)}): {fix}") from None


def one_line(error: Exception, limit: int) -> str:
    """An exception's message on one line (a YAML parser's points at the column over several), cut at `limit`."""
    return " ".join(str(error).split())[:limit]


def unsafe_checkpoint(folder, error: Exception) -> RlftError:
    """What a user sees when torch.load(weights_only=True) refuses a checkpoint file: it holds code."""
    return RlftError(
        f"checkpoint '{folder}' holds objects other than tensors and numbers, refused unread "
        f"({str(error).splitlines()[0][:120]}): it was not written by rlft; delete it, or set resume=false"
    )


def stage_metrics(metrics: dict, started: float) -> dict:
    """A stage's metrics.json: its own figures, its wall time since `started` (time.time()) and peak RSS."""
    return {**metrics, "wall_time_s": time.time() - started, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB. On Linux the high-water mark of this process image
    (VmHWM): ru_maxrss also counts the image it was started from, so a stage launched by a big process (a
    benchmark, a notebook) would report that one's peak. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**10  # kB
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
