"""`rlft <stage> --config configs/<stage>.yaml key.sub=value ...`: one command per stage.

Configs are parsed and checked before anything heavy is imported or loaded. Problems a user can fix
(RlftError) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path

import yaml

from rlft.config import describe, load_config, to_dict
from rlft.errors import RlftError

# stage -> (module with run(config), config class, what it does)
STAGES = {
    "sft": ("rlft.sft", "SFTConfig", "supervised LoRA / QLoRA fine-tuning"),
    "reward": ("reward_models.train", "RewardConfig", "train a reward model on preference pairs"),
    "preferences": ("reward_models.preferences", "PreferenceConfig", "build preference pairs with a judge"),
    "ppo": ("rlft.ppo.train", "PPOConfig", "PPO with a LoRA policy against its frozen reference"),
    "eval": ("rlft.evaluate", "EvalConfig", "reward and KL-drift report for policies against their reference"),
    "pipeline": ("rlft.pipeline", "PipelineConfig", "SFT, preferences, reward model, PPO and report in one go"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlft", description="KL-constrained fine-tuning of causal LMs (RLHF).")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, _, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=f"rlft {name}: {help_text}")
        stage.add_argument("--config", help=f"YAML config (e.g. configs/{name}.yaml); defaults if omitted")
        stage.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
        stage.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
        stage.add_argument("--list-options", action="store_true", help="list every config key with its help")
    return parser


class PrintedAlready(logging.Filter):
    """Drop records that a library's own handler printed already (huggingface_hub and datasets keep one
    and still propagate to ours): every warning once."""
    def filter(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        while logger.parent is not None:  # up to, not including, the root logger
            if logger.handlers:
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(PrintedAlready())
    for noisy in ("bitsandbytes", "httpx", "urllib3", "filelock", "datasets", "accelerate.utils.other"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not the user's
    import datasets

    datasets.disable_progress_bars()  # per-map bars drown the log; the training bars stay


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    signal.signal(signal.SIGTERM, interrupt)  # a scheduler's kill is an interruption like Ctrl-C
    # Ctrl-C interrupts whatever the parent process left: a launcher may pass SIGINT on ignored or blocked (and
    # Python then leaves it so), and the run would never hear it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    module_name, class_name, _ = STAGES[args.stage]
    config = None
    try:
        module = importlib.import_module(module_name)
        config_class = getattr(module, class_name)
        if args.list_options:
            for key, kind, default, help_text in describe(config_class):
                print(f"{key} ({kind}, default {default!r}): {help_text}")
            return 0
        config = load_config(config_class, args.config, args.overrides)
        if args.show_config:
            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        module.run(config)
    except RlftError as e:
        return fail(args.stage, str(e))
    except Exception as e:
        problem = write_problem(e, config)
        if problem is None:
            raise  # a bug: keep its traceback
        return fail(args.stage, problem)
    except KeyboardInterrupt as e:
        where = f" in {config.output_dir}" if config is not None else ""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the last line short
        close_progress_bars()
        print(f"rlft {args.stage}: {str(e) or 'interrupted'}; the checkpoints{where} are intact: rerun the same "
              "command to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if "rlft.runs" in sys.modules:  # imported by every stage that claimed an output folder
            sys.modules["rlft.runs"].release_locks()
    return 0


def fail(stage: str, problem: str) -> int:
    """The one line a user reads, last: progress bars the error cut short are closed first."""
    close_progress_bars()
    print(f"rlft {stage}: error: {problem}", file=sys.stderr)
    return 2


def close_progress_bars() -> None:
    """Close every open tqdm bar, which redraws it one last time, so that nothing is drawn after our last line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.flush()


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_problem(error: Exception, config) -> str | None:
    """One line for a failed write (a full disk, a read-only or forbidden folder), else None.

    torch.save reports a full disk as a RuntimeError from its zip writer, with no errno: the free space
    left under output_dir tells that case apart.
    """
    folder = getattr(config, "output_dir", None)
    if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
        what = error.strerror + (f" writing '{error.filename}'" if error.filename else "")
    elif folder and Path(folder).is_dir() and shutil.disk_usage(folder).free < 16 * 2**20:
        what = f"a write failed and the disk of '{folder}' is full ({shutil.disk_usage(folder).free // 1024} KiB free)"
    else:
        return None
    return (f"{what}: free some space (or pick another output_dir), then rerun the same command; it resumes from "
            "the last complete checkpoint")


class Terminated(KeyboardInterrupt):
    pass


def interrupt(signum, frame):
    raise Terminated("terminated (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())
