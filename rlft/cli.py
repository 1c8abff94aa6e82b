"""`rlft <stage> --config configs/<stage>.yaml key.sub=value ...`: one command per stage.

Configs are parsed and checked before anything heavy is imported or loaded. Problems a user can fix
(RlftError) print one line each and exit 2; anything else is a bug and keeps its traceback. `rlft plan` and
every stage's `--dry-run` check a run's inputs and size its memory without loading weights (rlft/plan.py).
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
    "dpo": ("rlft.dpo", "DPOConfig", "DPO, IPO or SimPO of a LoRA policy on preference pairs"),
    "eval": ("rlft.evaluate", "EvalConfig", "reward and KL-drift report for policies against their reference"),
    "pipeline": ("rlft.pipeline", "PipelineConfig", "SFT, preferences, reward model, PPO and report in one go"),
}
# config file names that do not start with their stage's name (configs/sft_qlora.yaml is sft's)
CONFIG_NAMES = {"quickstart": "pipeline"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlft", description="KL-constrained fine-tuning of causal LMs (RLHF).")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, _, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=f"rlft {name}: {help_text}")
        stage.add_argument("--config", help=f"YAML config (e.g. configs/{name}.yaml); defaults if omitted")
        stage.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
        stage.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
        stage.add_argument("--list-options", action="store_true", help="list every config key with its help")
        stage.add_argument("--dry-run", action="store_true", help="check the inputs and plan the memory (as "
                           "`rlft plan`), loading no weights, then exit without training")
    plan = sub.add_parser("plan", help="check a stage's or pipeline's inputs and plan its memory, loading no weights",
                          description="rlft plan: check a run's inputs in seconds (tokenizer, data, chat template, "
                          "LoRA targets, context, scorers, output_dir) and size its memory per process")
    plan.add_argument("--config", help="YAML config of a stage or pipeline (e.g. configs/quickstart.yaml)")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    plan.add_argument("--stage", choices=list(STAGES), dest="planned",
                      help="the stage the config is for; default: from the file's name (sft_qlora.yaml: sft)")
    plan.add_argument("--device", help="cpu (this machine's RAM), cuda (the GPU's memory) or a GPU's memory in GiB; "
                      "default: the GPU if one is visible, else cpu")
    plan.add_argument("--processes", type=int, default=1, help="processes (GPUs) the run is launched on")
    plan.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                      help="with several processes: a full copy in each (ddp) or the weights sharded (fsdp)")
    plan.add_argument("--json", metavar="PATH", dest="json_path",
                      help="also write each stage's memory parts, peak (MiB) and workload to PATH as JSON")
    return parser


def planned_stage(args) -> str:
    """The stage `rlft plan` plans: --stage, or the one its config file's name starts with."""
    if args.planned:
        return args.planned
    prefix = Path(args.config).stem.split("_")[0] if args.config else ""
    stage = CONFIG_NAMES.get(prefix, prefix)
    if stage not in STAGES:
        what = f"from the name of '{args.config}'" if args.config else "without --config"
        raise RlftError(f"cannot tell which stage to plan {what}: add --stage {{{','.join(STAGES)}}}")
    return stage


def plan_options(args) -> dict:
    """Where the run is planned for: `rlft plan`'s options, or for --dry-run this process's own launch."""
    if args.stage == "plan":
        return {"device": args.device, "processes": args.processes, "strategy": args.strategy,
                "json_path": args.json_path}
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return {"processes": int(os.environ.get("WORLD_SIZE", "1")), "strategy": "fsdp" if fsdp else "ddp"}


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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes one run of positionals: overrides after an option (`--processes 2 lora.r=8`) come back here
    if any(item.startswith("-") or "=" not in item for item in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    setup_logging()
    signal.signal(signal.SIGTERM, interrupt)  # a scheduler's kill is an interruption like Ctrl-C
    # Ctrl-C interrupts whatever the parent process left: a launcher may pass SIGINT on ignored or blocked (and
    # Python then leaves it so), and the run would never hear it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    planning = args.stage == "plan"
    config = None
    try:
        stage = planned_stage(args) if planning else args.stage
        module_name, class_name, _ = STAGES[stage]
        module = importlib.import_module(module_name)
        config_class = getattr(module, class_name)
        if not planning and args.list_options:
            for key, kind, default, help_text in describe(config_class):
                print(f"{key} ({kind}, default {default!r}): {help_text}")
            return 0
        config = load_config(config_class, args.config, args.overrides)
        if not planning and args.show_config:
            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        if planning or args.dry_run:
            importlib.import_module("rlft.plan").run(stage, config, **plan_options(args))
            return 0
        module.run(config)
        if "torch.distributed" in sys.modules:
            importlib.import_module("rlft.distributed").end_process_group(finished=True)
    except RlftError as e:
        return fail(args.stage, str(e))
    except Exception as e:
        problem = write_problem(e, config, args.stage)
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
        if "torch.distributed" in sys.modules:
            importlib.import_module("rlft.distributed").end_process_group()
    return 0


def fail(stage: str, problem: str) -> int:
    """The line a user reads, last (a line per problem where a plan found several): progress bars the error cut
    short are closed first."""
    close_progress_bars()
    for line in problem.splitlines() or [""]:
        print(f"rlft {stage}: error: {line}", file=sys.stderr)
    return 2


def close_progress_bars() -> None:
    """Close every open tqdm bar, which redraws it one last time, so that nothing is drawn after our last line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.flush()


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_problem(error: Exception, config, stage: str) -> str | None:
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
    # preferences and eval keep no checkpoints: their rerun starts over (a finished earlier run stays whole)
    resumes = "it starts over" if stage in ("preferences", "eval") else "it resumes from the last complete checkpoint"
    return f"{what}: free some space (or pick another output_dir), then rerun the same command; {resumes}"


class Terminated(KeyboardInterrupt):
    pass


def interrupt(signum, frame):
    raise Terminated("terminated (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())
