"""Time rlft PPO steps against the nearest peer, TRL's GRPOTrainer, at equal settings, in one run.

    python benchmarks/ppo_step.py                       # 16 completions/step, 32 new tokens, 1 warmup + 3 steps
    python benchmarks/ppo_step.py --completions 8 --max-new-tokens 16 --steps 2 --json out.json

Each side runs in its own child process (this file with --child), so each peak RSS is that side's alone;
the parent prints one table and the ratios rlft/TRL. What "equal settings" means is in benchmarks/README.md:
same embedded model and dtype, same LoRA, same prompts each step (completions/num_generations prompts, each
sampled num_generations times), same number of completions per step and generated length, one update epoch
over the whole batch (one optimiser step), a fixed KL coefficient beta against the base with the adapter off,
and the same cheap rule reward (`word_count_reward` below), so the reward model is not what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SIDES = ("rlft", "trl")
PHASES = ("generate", "score", "forward", "update")  # rlft's time/* names; TRL's are mapped onto them


@dataclass
class Settings:
    """One benchmark configuration, shared by both sides (written to JSON for the child processes)."""

    completions: int = 16  # completions per step = rlft rollout_batch_size = TRL generation batch
    num_generations: int = 4  # completions per prompt (GRPO's group size); rlft gets the same prompt multiset
    max_new_tokens: int = 32
    equal_lengths: bool = True  # suppress EOS until max_new_tokens on both sides, so generated tokens match
    warmup: int = 1  # steps run but not measured (allocator and kernel warm-up)
    steps: int = 3  # measured steps
    beta: float = 0.05  # fixed KL coefficient on both sides
    learning_rate: float = 1e-5
    temperature: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0
    threads: int = 0  # torch threads per child (0: torch's default)
    model: str = "smollm2-135m-instruct"
    estimator: str = "gae"  # rlft's side: gae (PPO with a critic) or grpo (like with like against TRL's GRPO)
    dtype: str = "float32"  # both sides: the base's weights; bfloat16 also turns on TRL's bf16 (autocast) switch

    @property
    def prompts_per_step(self) -> int:
        return self.completions // self.num_generations


def word_count_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """Score = words / 10. Both sides call this; TRL passes conversational completions as message lists."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(text.split()) / 10 for text in texts]


# ---------------------------------------------------------------------------------------------------
# Parent: prompts, children, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=Settings.completions, help="Completions per step.")
    parser.add_argument("--num-generations", type=int, default=Settings.num_generations,
                        help="Completions per prompt (GRPO group size; must divide --completions).")
    parser.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens)
    parser.add_argument("--steps", type=int, default=Settings.steps, help="Measured steps.")
    parser.add_argument("--warmup", type=int, default=Settings.warmup, help="Unmeasured steps first.")
    parser.add_argument("--natural-lengths", action="store_true",
                        help="Let completions stop at EOS (default: both sides generate exactly --max-new-tokens).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch default).")
    parser.add_argument("--estimator", choices=("gae", "grpo"), default="gae",
                        help="rlft's advantage estimator: gae (PPO + critic) or grpo (TRL's algorithm: groups, "
                             "KL in the loss, no critic).")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="Both sides' base weights; bfloat16 also sets TRL's bf16=True (its fastest on CPUs "
                             "with AVX512-BF16/AMX).")
    parser.add_argument("--trl-dtypes", nargs="+", choices=("float32", "bfloat16"),
                        help="Run TRL at each of these dtypes (default: --dtype) and compare rlft with the fastest.")
    parser.add_argument("--skip-trl", action="store_true", help="Time rlft only.")
    parser.add_argument("--json", help="Also write the results here.")
    parser.add_argument("--keep", help="Keep the run directories and child logs under this folder.")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--side-dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        return child(args.child, Path(args.workdir), args.side_dtype)

    settings = Settings(completions=args.completions, num_generations=args.num_generations,
                        max_new_tokens=args.max_new_tokens, equal_lengths=not args.natural_lengths,
                        warmup=args.warmup, steps=args.steps, threads=args.threads, estimator=args.estimator,
                        dtype=args.dtype)
    if settings.completions % settings.num_generations or settings.num_generations < 2:
        parser.error("--num-generations must be >= 2 and divide --completions")
    if settings.steps < 1 or settings.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rlft-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    write_prompts(settings, workdir)

    results, trl_by_dtype = {}, {}
    runs = [("rlft", args.dtype)] + [("trl", dtype) for dtype in (args.trl_dtypes or [args.dtype])] * (not args.skip_trl)
    for side, dtype in runs:
        print(f"running {side} in {dtype} ({settings.warmup} warmup + {settings.steps} measured steps) ...", flush=True)
        started = time.perf_counter()
        log_path = workdir / f"{side}_{dtype}.log"
        with open(log_path, "w") as log:
            code = subprocess.call([sys.executable, __file__, "--child", side, "--workdir", str(workdir),
                                    "--side-dtype", dtype], stdout=log, stderr=subprocess.STDOUT, env=child_env())
        if code != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
            print(f"{side} failed (exit {code}); last lines of {log_path}:\n{tail}", file=sys.stderr)
            return 1
        summary = {"dtype": dtype, **summarize(json.loads((workdir / f"{side}.json").read_text()), settings)}
        if side == "trl":
            trl_by_dtype[dtype] = summary
        else:
            results[side] = summary
        print(f"  done in {time.perf_counter() - started:.0f}s", flush=True)
    if trl_by_dtype:  # the peer at its fastest setting
        results["trl"] = max(trl_by_dtype.values(), key=lambda summary: summary["completions_per_s"])

    from rlft.results import cpu  # here, not at the top: the children measure their RSS after their own imports

    report = {"settings": asdict(settings), "command": reproduce_command(args), "machine": cpu(),
              "results": results, "ratios": ratios(results),
              "trl_by_dtype": {dtype: summary["completions_per_s"] for dtype, summary in trl_by_dtype.items()}}
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def child_env() -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def write_prompts(settings: Settings, workdir: Path) -> None:
    """The step's prompts: `prompts_per_step` distinct chatterbot prompts, the same ones every step.

    rlft gets each repeated num_generations times (rollout_batch_size = completions, so every step takes the
    whole file: the same multiset GRPO samples from the distinct ones). Fixed prompts keep the prompt
    lengths, hence the compute per step, identical on both sides and across steps.
    """
    import random

    from rlft.data import load_any, prompts_of

    pool, seen = [], set()
    for prompt in prompts_of(load_any("chatterbot")):
        if prompt[-1]["content"] not in seen:
            seen.add(prompt[-1]["content"])
            pool.append(prompt)
    chosen = random.Random(settings.seed).sample(pool, settings.prompts_per_step)
    (workdir / "prompts.json").write_text(json.dumps(chosen))
    with open(workdir / "rlft_prompts.jsonl", "w") as f:
        for prompt in chosen:
            # grpo groups the repeats itself (ppo.num_generations); gae gets them spelled out
            repeats = 1 if settings.estimator == "grpo" else settings.num_generations
            f.writelines(json.dumps({"prompt": prompt}) + "\n" for _ in range(repeats))


def summarize(raw: dict, settings: Settings) -> dict:
    """Throughput over the measured steps as total work / total time, computed the same way for both sides."""
    steps = raw["steps"][settings.warmup :]
    total = sum(s["step"] for s in steps)
    tokens = sum(s["length"] * settings.completions for s in steps)
    return {
        "completions_per_s": settings.completions * len(steps) / total,
        "tokens_per_s": tokens / total,
        "mean_length": sum(s["length"] for s in steps) / len(steps),
        "peak_rss_mib": raw["peak_rss_mib"],
        "rss_after_imports_mib": raw["rss_after_imports_mib"],
        "time": {phase: sum(s[phase] for s in steps) / len(steps) for phase in (*PHASES, "step")},
        "step_time_range": [min(s["step"] for s in steps), max(s["step"] for s in steps)],
        "cpu_s_per_step": sum(s["cpu"] for s in steps) / len(steps),
        "cpu_completions_per_s": settings.completions * len(steps) / sum(s["cpu"] for s in steps),
        # CPU seconds over (wall seconds x torch threads): well under 1 means other processes took the cores
        "busy_share": sum(s["cpu"] for s in steps) / (total * raw["versions"]["torch_threads"]),
        "steps": raw["steps"],
        "versions": raw["versions"],
    }


def ratios(results: dict) -> dict:
    if set(results) != set(SIDES):
        return {}
    rlft, trl = results["rlft"], results["trl"]
    return {key: rlft[key] / trl[key]
            for key in ("completions_per_s", "tokens_per_s", "peak_rss_mib", "cpu_completions_per_s")}


def reproduce_command(args) -> str:
    parts = ["python", "benchmarks/ppo_step.py", "--completions", args.completions, "--num-generations",
             args.num_generations, "--max-new-tokens", args.max_new_tokens, "--warmup", args.warmup,
             "--steps", args.steps]
    parts += ["--natural-lengths"] * args.natural_lengths + ["--threads", args.threads] * bool(args.threads)
    parts += ["--estimator", args.estimator] * (args.estimator != "gae")
    parts += ["--dtype", args.dtype] * (args.dtype != "float32")
    parts += ["--trl-dtypes", *args.trl_dtypes] if args.trl_dtypes else []
    parts += ["--skip-trl"] * args.skip_trl + ["--json", args.json] * bool(args.json)
    cache = f"RLFT_CACHE={shlex.quote(os.environ['RLFT_CACHE'])} " if "RLFT_CACHE" in os.environ else ""
    return cache + shlex.join(map(str, parts))


def print_table(report: dict) -> None:
    results, s = report["results"], report["settings"]
    print(f"\nPPO step benchmark (rlft estimator {s.get('estimator', 'gae')}): {s['model']}, LoRA r={s['lora_r']} alpha={s['lora_alpha']} all-linear, "
          f"{s['completions']} completions/step ({s['completions'] // s['num_generations']} prompts x "
          f"{s['num_generations']}), max_new_tokens={s['max_new_tokens']}"
          f"{' (EOS suppressed: equal lengths)' if s['equal_lengths'] else ''}, beta={s['beta']}, "
          f"1 epoch, 1 optimiser step; mean over {s['steps']} steps after {s['warmup']} warmup")
    rows = [
        ("completions/s", "completions_per_s", "{:.2f}"),
        ("tokens/s (generated)", "tokens_per_s", "{:.1f}"),
        ("mean completion length", "mean_length", "{:.1f}"),
        ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
        ("  of which imports MiB", "rss_after_imports_mib", "{:.0f}"),
    ] + [(f"time/{phase} s", phase, "{:.3f}") for phase in (*PHASES, "step")] + [
        ("CPU s/step (all threads)", "cpu_s_per_step", "{:.2f}"),
        ("completions per CPU s", "cpu_completions_per_s", "{:.3f}"),
        ("CPU busy share", "busy_share", "{:.2f}"),
    ]
    sides = [side for side in SIDES if side in results]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    header = f"{'':28}" + "".join(f"{side + ' ' + short[results[side]['dtype']]:>12}" for side in sides) + ("    rlft/TRL" if len(sides) == 2 else "")
    print(header)
    for label, key, fmt in rows:
        values = [results[side]["time"][key] if key in (*PHASES, "step") else results[side][key] for side in sides]
        line = f"{label:28}" + "".join(f"{fmt.format(v):>12}" for v in values)
        if len(values) == 2 and values[1]:
            line += f"{values[0] / values[1]:>11.2f}x"
        print(line)
    if len(report.get("trl_by_dtype", {})) > 1:
        print("TRL completions/s by dtype: " + ", ".join(f"{dtype} {value:.2f}" for dtype, value in
                                                         report["trl_by_dtype"].items()) + " (the table's: the fastest)")
    if report["ratios"]:
        r = report["ratios"]
        print(f"\nrlft/TRL: {r['completions_per_s']:.2f}x completions/s, {r['tokens_per_s']:.2f}x tokens/s, "
              f"{r['peak_rss_mib']:.2f}x peak RSS; {r['cpu_completions_per_s']:.2f}x completions per CPU second")
    spread = ", ".join(f"{side} {results[side]['step_time_range'][0]:.2f}-{results[side]['step_time_range'][1]:.2f}"
                       for side in sides)
    print(f"measured step times (min-max s): {spread}")
    if any(results[side]["busy_share"] < 0.9 for side in sides):
        print("warning: CPU busy share < 0.9: other processes shared the CPU, so wall-clock figures are inflated; "
              "rerun on a quiet machine (completions per CPU s is the steadier comparison meanwhile)")
    print(f"versions: {results[sides[0]]['versions']}")
    print(f"reproduce: {report['command']}")


# ---------------------------------------------------------------------------------------------------
# Children: one side each; they write {workdir}/{side}.json with per-step figures


def child(side: str, workdir: Path, dtype: str | None = None) -> int:
    """Run one side (at `dtype`, else the settings'); each imports only what it uses, so its peak RSS carries no
    other library."""
    from importlib.metadata import version

    import torch

    from rlft.runs import peak_rss_mb

    settings = Settings(**json.loads((workdir / "settings.json").read_text()))
    if dtype:
        settings.dtype = dtype
    if settings.threads:
        torch.set_num_threads(settings.threads)
    versions = {name: version(name) for name in ("torch", "transformers", "trl", "peft")}
    versions["torch_threads"] = torch.get_num_threads()
    steps, rss_after_imports = run_rlft(settings, workdir) if side == "rlft" else run_trl(settings, workdir)
    result = {"steps": steps, "peak_rss_mib": peak_rss_mb(), "rss_after_imports_mib": rss_after_imports,
              "versions": versions}
    (workdir / f"{side}.json").write_text(json.dumps(result, indent=2))
    return 0


def run_rlft(settings: Settings, workdir: Path) -> tuple[list[dict], float]:
    """rlft.ppo.train.run on the settings; per-step figures from its metrics.jsonl."""
    from rlft.config import load_config
    from rlft.ppo import train
    from rlft.ppo.config import PPOConfig
    from rlft.runs import peak_rss_mb

    rss_after_imports = peak_rss_mb()

    n, total_steps = settings.completions, settings.warmup + settings.steps
    # By module name (this file's folder is sys.path[0] in the child), not by file path: a scorer file loaded
    # by path is not registered in sys.modules, and the @dataclass above then fails to import.
    reward = {"kind": "function", "path": f"{Path(__file__).stem}:word_count_reward"}
    overrides = [
        f"output_dir={workdir / 'rlft_run'}", "resume=false", f"seed={settings.seed}", "sft_adapter=",
        f"save_every={total_steps}", f"sample_every={total_steps}",
        f"model.name_or_path={settings.model}", f"model.dtype={settings.dtype}",
        f"lora.r={settings.lora_r}", f"lora.alpha={settings.lora_alpha}", "lora.dropout=0.0",
        "lora.target_modules=[all-linear]",
        f"data.path={workdir / 'rlft_prompts.jsonl'}", "data.eval_split=train",  # every row is a training prompt
        f"sampling.max_new_tokens={settings.max_new_tokens}", f"sampling.temperature={settings.temperature}",
        "sampling.top_p=1.0", "sampling.top_k=0",
        # equal lengths: EOS banned until max_new_tokens (PPO's log-probs apply the same ban); TRL gets the same
        # through GRPOConfig.generation_kwargs
        f"sampling.min_new_tokens={settings.max_new_tokens if settings.equal_lengths else 0}",
        *(["ppo.advantage_estimator=grpo", f"ppo.num_generations={settings.num_generations}", "ppo.kl_in=loss"]
          if settings.estimator == "grpo" else []),
        f"reward={json.dumps([reward])}",
        f"ppo.steps={total_steps}", f"ppo.rollout_batch_size={n}", f"ppo.mini_batch_size={n}",
        f"ppo.forward_batch_size={n}", "ppo.gradient_accumulation_steps=1", "ppo.ppo_epochs=1",
        f"ppo.learning_rate={settings.learning_rate}", f"ppo.kl_coef={settings.beta}", "ppo.kl_control=fixed",
    ]
    train.run(load_config(PPOConfig, None, overrides))
    metrics = [json.loads(line) for line in (workdir / "rlft_run" / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step": m["time/step"], **{phase: m[f"time/{phase}"] for phase in PHASES},
              "length": m["response/length"], "cpu": m["time/cpu_step"]} for m in metrics]
    return steps, rss_after_imports


def run_trl(settings: Settings, workdir: Path) -> tuple[list[dict], float]:
    """trl.GRPOTrainer on the settings; per-step figures from a callback and TRL's own phase timers."""
    import datasets
    import peft
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from rlft.models import resolve
    from rlft.runs import peak_rss_mb

    rss_after_imports = peak_rss_mb()

    # TRL times its own phases (generate, rewards, _prepare_inputs = generate + score + reference
    # forward) but only reports them to wandb/mlflow; collect them per step instead.
    phase_seconds: dict[str, float] = {}

    def record(self, duration: float) -> None:
        name = self.name.split(".", 1)[1]
        phase_seconds[name] = phase_seconds.get(name, 0.0) + duration

    profiling.ProfilingContext._log_metrics = record

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            phase_seconds.clear()
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            step, cpu = time.perf_counter() - self.started, time.process_time() - self.cpu_started
            generate = phase_seconds.get("transformers.generate", 0.0)
            score = phase_seconds.get("word_count_reward", 0.0)
            prepare = phase_seconds.get("_prepare_inputs", 0.0)
            self.steps.append({"step": step, "cpu": cpu, "generate": generate, "score": score,
                               "forward": prepare - generate - score, "update": step - prepare})

    path = resolve(settings.model)
    prompts = json.loads((workdir / "prompts.json").read_text())
    n, total_steps = settings.completions, settings.warmup + settings.steps
    config = GRPOConfig(
        output_dir=str(workdir / "trl_run"),
        seed=settings.seed,
        model_init_kwargs={"dtype": settings.dtype},
        per_device_train_batch_size=n,  # one micro-batch per step...
        gradient_accumulation_steps=1,
        steps_per_generation=1,  # ...and one generation of n completions per optimiser step
        num_generations=settings.num_generations,
        num_iterations=1,  # one update epoch
        max_completion_length=settings.max_new_tokens,
        generation_kwargs={"min_new_tokens": settings.max_new_tokens} if settings.equal_lengths else None,
        temperature=settings.temperature,
        top_p=1.0,
        top_k=0,
        beta=settings.beta,
        learning_rate=settings.learning_rate,
        max_steps=total_steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=settings.dtype == "bfloat16",
        use_cpu=True,
        gradient_checkpointing=False,
        disable_dropout=True,
        disable_tqdm=True,
    )
    lora = peft.LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                           target_modules="all-linear", task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=path,
        reward_funcs=word_count_reward,
        args=config,
        train_dataset=datasets.Dataset.from_list([{"prompt": prompt} for prompt in prompts]),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=lora,
        callbacks=[timer],
    )
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history
               if "completions/mean_length" in entry]
    if len(lengths) != len(timer.steps):
        raise RuntimeError(f"TRL logged {len(lengths)} steps' lengths for {len(timer.steps)} timed steps")
    return [{**step, "length": length} for step, length in zip(timer.steps, lengths)], rss_after_imports


if __name__ == "__main__":
    sys.exit(main())
