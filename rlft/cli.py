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
import signal
import sys
import warnings

from rlft.config import describe, load_config
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


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
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
            from rlft.config import to_dict
            import yaml

            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        module.run(config)
    except RlftError as e:
        print(f"rlft {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        print(f"rlft {args.stage}: error: {disk_problem(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch.save reports a full disk as a RuntimeError from its zip writer
        if "write failed" not in str(e) and "No space left" not in str(e):
            raise
        print(f"rlft {args.stage}: error: {disk_problem(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        where = f" in {config.output_dir}" if config is not None else ""
        print(f"rlft {args.stage}: {e or 'interrupted'}; the checkpoints{where} are intact: rerun the same "
              "command to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def disk_problem(error: Exception) -> str:
    what = getattr(error, "strerror", None) or "a write failed (disk full?)"
    file = f" writing '{error.filename}'" if getattr(error, "filename", None) else ""
    return (f"{what}{file}: free some space or pick another output_dir, then rerun the same command; it resumes "
            "from the last complete checkpoint")


class Terminated(KeyboardInterrupt):
    pass


def interrupt(signum, frame):
    raise Terminated("terminated (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())
