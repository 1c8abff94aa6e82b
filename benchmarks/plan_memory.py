"""`rlft plan`'s predicted peak memory per process against the measured peak RSS, stage by stage.

    python benchmarks/plan_memory.py --json benchmarks/results/plan_memory.json    # the real cases, ~15-25 min
    python benchmarks/plan_memory.py --tiny --threads 1                          # plumbing check: seconds a case
    python benchmarks/plan_memory.py --table-only --json benchmarks/results/plan_memory.json
    python benchmarks/plan_memory.py --json ... --resume --models large         # add a model's cases to a JSON

Each case is planned with `rlft plan ... --device cpu --json` (in this process: no weights are loaded) on the
very config and overrides of its run, then run for a few steps as its own process tree (`python -m rlft`, or
`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m rlft ppo` for FSDP), one case
after the other. Measured, per case:

    peak_rss_mb         the stage's metrics.json: the peak RSS of its main process (rank 0 under FSDP; VmHWM, this
                        process image's own: ru_maxrss would count this script's memory, the image it started from)
    largest_process_mb  the largest of every process's peak (PPO gathers them under FSDP), MiB

Cases, on the embedded SmolLM2-135M and on a random-weight Llama-shaped model (`--models embedded large`; the
large one ~0.48B at the defaults, with SmolLM2's tokenizer, written in bfloat16 to <out>/large_model and reused
while its shape is the same; `tiny` adds a tiny random Llama, whose peak is nearly all runtime):

    runtime         the interpreter and the stages' imports, no model or data: a floor for memory.RUNTIME_MIB
    sft_lora        configs/sft.yaml
    sft_qlora       configs/sft_qlora.yaml (4-bit NF4 base, bitsandbytes)
    reward          configs/reward.yaml: MiniLM-L6 fine-tuned in full (once, not per model)
    reward_lora     a LoRA reward adapter on the policy's base (+ its SFT adapter): the one-base reward model
    ppo_head        configs/ppo.yaml, head critic, the VADER judge as reward (no reward network)
    ppo_one_base    configs/quickstart_one_base.yaml's PPO: reward_lora's adapter as the reward (kind: adapter)
                    and an adapter critic, all on one base
    ppo_fsdp        ppo_head under FSDP2 over --processes CPU processes (gloo)

PPO starts from the quickstart's SFT adapter (--quickstart) on the embedded model when there is one, else from
the sft_lora case's adapter; reward data are the quickstart's preference pairs when there are some, else the
built-in chatterbot-sentiment pairs. Every process runs --threads threads (split between FSDP's processes).
A few steps each: --sft-steps and --reward-steps optimiser steps (evaluation and the reward's normalisation on
small slices: 16 to 128 rows), --ppo-steps PPO steps of --ppo-rows rollout rows (also the update's micro-batch
and the no-grad forward batch) x --max-new-tokens, one epoch, on 16 prompts (every one drawn, the longest too);
SFT generates no samples after training. SFT and reward batch rows of like length, the longest first, so their
first step holds the data's longest rows, as the plan assumes.

The JSON keeps, per case, the plan's parts and the workload they were computed from, and the memory constants
in force. After changing a constant in rlft/memory.py, `--table-only` recomputes every prediction from the
recorded workloads (nothing is rerun) and rewrites the table: that is how the constants are calibrated.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlft import memory  # noqa: E402

CONFIGS = ROOT / "configs"
PPO_CONFIG = str(CONFIGS / "ppo.yaml")
GOLD = "{name: gold, kind: function, path: 'reward_models.judges:sentiment'}"
TOLERANCE = 0.2  # within +-20%: |predicted / measured - 1| <= TOLERANCE
LARGE = {"hidden": 1536, "layers": 16, "intermediate": 4096, "heads": 24, "kv_heads": 8}
TINY = {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2}  # bitsandbytes: rows >= 64
STAGE_IMPORTS = ("rlft.sft", "reward_models.train", "rlft.ppo.train", "peft", "trl")


@dataclass
class Case:
    name: str
    model: str  # the label of the model in the table
    stage: str  # sft, reward, ppo; runtime: imports only
    config: str = ""
    overrides: list[str] = field(default_factory=list)
    processes: int = 1
    strategy: str = "ddp"  # fsdp: accelerate launch with configs/accelerate/fsdp.yaml

    @property
    def key(self) -> str:
        return f"{self.model}/{self.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here, and the markdown table beside it (.md)")
    parser.add_argument("--table-only", action="store_true",
                        help="recompute the predictions of --json's cases with rlft/memory.py as it is now and "
                        "rewrite its table; nothing is run")
    parser.add_argument("--replan", action="store_true",
                        help="plan --json's cases again with rlft as it is now (their runs' folders must still be "
                        "there: PPO's reward adapter); the measurements are kept, nothing is run")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama (and BERT) for every model, one "
                        "step per case: checks this script's plumbing in seconds a case")
    parser.add_argument("--quickstart", default="runs/quickstart",
                        help="a finished quickstart: its SFT adapter (embedded model) and preference pairs")
    parser.add_argument("--out", default="", help="run folders (default runs/bench_plan_memory[_tiny])")
    parser.add_argument("--cases", nargs="+", default=[], metavar="PATTERN",
                        help="run only cases whose model/name contains one of these (e.g. embedded/ ppo_fsdp)")
    parser.add_argument("--models", nargs="+", choices=["embedded", "large", "tiny"], default=["embedded", "large"],
                        help="policy bases to run the cases on (tiny: a tiny random Llama, where the runtime is "
                        "nearly all of the peak)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases --json already holds without an error; run only the others")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads per case, split evenly between an FSDP launch's processes")
    parser.add_argument("--processes", type=int, default=2, help="processes of the FSDP cases")
    parser.add_argument("--sft-steps", type=int, default=3)
    parser.add_argument("--reward-steps", type=int, default=3)
    parser.add_argument("--ppo-steps", type=int, default=2)
    parser.add_argument("--ppo-rows", type=int, default=8,
                        help="ppo.rollout_batch_size = mini_batch_size = forward_batch_size (per process)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="PPO's sampling.max_new_tokens")
    for key, value in LARGE.items():
        parser.add_argument(f"--large-{key.replace('_', '-')}", type=int, default=value,
                            help=f"the random model's {key}")
    args = parser.parse_args()
    if args.table_only or args.replan:
        if not args.json:
            parser.error("--table-only and --replan need --json")
        results = json.loads(Path(args.json).read_text())
        if args.replan:
            replan(results, Path(args.out or "runs/bench_plan_memory").resolve())
            save(results, Path(args.json))
        write_table(results, Path(args.json))
        return
    if args.tiny:
        args.sft_steps = args.reward_steps = args.ppo_steps = 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out or ("runs/bench_plan_memory_tiny" if args.tiny else "runs/bench_plan_memory")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from rlft.results import machine

    models, reward_backbone = prepare_models(args, out)
    quickstart = Path(args.quickstart).resolve()
    cases = build_cases(args, out, models, reward_backbone, quickstart)
    cases = [case for case in cases if not args.cases or any(pattern in case.key for pattern in args.cases)]
    done = {}
    if args.resume and args.json and Path(args.json).is_file():
        done = {f"{case['model']}/{case['case']}": case for case in json.loads(Path(args.json).read_text())["cases"]
                if not case.get("error")}
    results = {
        "machine": machine(), "argv": sys.argv[1:], "tiny": args.tiny, "threads": args.threads,
        "settings": {key: getattr(args, key) for key in ("sft_steps", "reward_steps", "ppo_steps", "ppo_rows",
                                                         "max_new_tokens", "processes")},
        "models": {label: str(path) for label, path in models.items()},
        "constants": constants(), "tolerance": TOLERANCE, "cases": [],
    }
    started = time.time()
    for i, case in enumerate(cases, 1):
        print(f"\n[{i}/{len(cases)}] {case.key} ({time.time() - started:.0f} s so far)", flush=True)
        if case.key in done:
            print("  kept from --json (--resume)", flush=True)
            results["cases"].append(done[case.key])
            continue
        result = run_case(case, out, args.threads)
        results["cases"].append(result)
        measured, predicted = result["measured"].get("peak_rss_mb"), predicted_mib(result)
        print(f"  predicted {fmt(predicted)} MiB, measured {fmt(measured)} MiB (largest process "
              f"{fmt(result['measured'].get('largest_process_mb'))}), {result['measured'].get('wall_s', 0):.0f} s"
              + (f"; FAILED: {result['error']}" if result.get("error") else ""), flush=True)
        if args.json:  # after every case: an interrupted run keeps what it measured
            save(results, Path(args.json))
    results["total_s"] = time.time() - started
    print()
    print(markdown(results, args.json or "not saved"))
    if args.json:
        save(results, Path(args.json))
    if any(case.get("error") for case in results["cases"]):
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------
# Models and cases


def prepare_models(args, out: Path) -> tuple[dict[str, str], str]:
    """{label: model path} of the policy bases, and the reward case's backbone."""
    models = {}
    for label in ["tiny"] if args.tiny else args.models:
        if label == "embedded":
            models[label] = "smollm2-135m-instruct"
        elif label == "large":
            models[label] = str(write_llama(out / "large_model", {key: getattr(args, f"large_{key}") for key in LARGE}))
        else:
            models[label] = str(write_llama(out / "tiny_model", TINY))
    # reward: configs/reward.yaml's own backbone (MiniLM-L6), or with --tiny a tiny BERT
    return models, str(write_tiny_bert(out / "tiny_bert")) if args.tiny else ""


def write_llama(folder: Path, shape: dict) -> Path:
    """A random-weight Llama of `shape` with the embedded SmolLM2's tokenizer and chat template, saved in bfloat16;
    kept and reused while its shape is the same."""
    marker = folder / "bench_shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlft.config import ModelConfig
    from rlft.models import load_tokenizer

    shutil.rmtree(folder, ignore_errors=True)
    tokenizer = load_tokenizer(ModelConfig())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    print(f"writing a random {shape} Llama to {folder}", flush=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(shape))
    del model
    return folder


def write_tiny_bert(folder: Path) -> Path:
    """A tiny random BERT sequence classifier with the embedded MiniLM's tokenizer: --tiny's reward backbone."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rlft.models import MINILM, resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(MINILM))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_cases(args, out: Path, models: dict[str, str], reward_backbone: str, quickstart: Path) -> list[Case]:
    pairs = quickstart / "preferences" / "pairs.jsonl"
    pair_data = [f"data.path={pairs}", "data.eval_split=''"] if pairs.is_file() else \
        ["data.path=chatterbot-sentiment", "data.eval_split=test"]
    sft_steps = [f"train.max_steps={args.sft_steps}", "data.max_eval_samples=16", "num_samples=0"]
    reward_steps = [f"train.max_steps={args.reward_steps}", *pair_data]
    n = args.ppo_steps
    # 16 prompts (max_samples, after the hold-out): 2 steps of 8 rows draw every one, the longest too, which sets the
    # plan's peak as over a whole run
    ppo_steps = [f"ppo.steps={n}", f"save_every={n}", f"sample_every={n}", "ppo.ppo_epochs=1", "data.max_samples=16",
                 f"ppo.rollout_batch_size={args.ppo_rows}", f"ppo.mini_batch_size={args.ppo_rows}",
                 f"ppo.forward_batch_size={args.ppo_rows}", f"sampling.max_new_tokens={args.max_new_tokens}",
                 # a random model's bf16 sampler may drift past the 0.2 nats that stop a run: memory is the point
                 "ppo.max_sampler_gap=100"]
    cases = [Case("runtime", "imports", "runtime"),
             Case("reward", "minilm" if not args.tiny else "tiny_bert", "reward", str(CONFIGS / "reward.yaml"),
                  [*reward_steps, "data.max_samples=128", "data.max_eval_samples=64",
                   *([f"model.name_or_path={reward_backbone}"] if reward_backbone else [])])]
    for label, path in models.items():
        model = f"model.name_or_path={path}"
        own_sft = out / label / "sft_lora"
        quickstart_sft = quickstart / "sft"
        use_quickstart = label == "embedded" and (quickstart_sft / "adapter_config.json").is_file()
        sft_adapter = str(quickstart_sft if use_quickstart else own_sft)
        reward_dir = out / label / "reward_lora"
        adapter = f"{{name: proxy, kind: adapter, path: {reward_dir}, normalize: true, max_length: 128}}"
        cases += [
            Case("sft_lora", label, "sft", str(CONFIGS / "sft.yaml"), [model, *sft_steps]),
            Case("sft_qlora", label, "sft", str(CONFIGS / "sft_qlora.yaml"), [model, *sft_steps]),
            Case("reward_lora", label, "reward", str(CONFIGS / "reward.yaml"),
                 [f"model.name_or_path={path}", "lora_enabled=true", "lora.dropout=0.0", "train.batch_size=8",
                  f"sft_adapter={sft_adapter}", *reward_steps, "data.max_samples=64", "data.max_eval_samples=32"]),
            Case("ppo_head", label, "ppo", PPO_CONFIG, [model, f"sft_adapter={sft_adapter}", f"reward=[{GOLD}]",
                                                        "ppo.critic=head", *ppo_steps]),
            Case("ppo_one_base", label, "ppo", PPO_CONFIG, [model, f"sft_adapter={sft_adapter}", f"reward=[{adapter}]",
                                                            "ppo.critic=adapter", *ppo_steps]),
            Case("ppo_fsdp", label, "ppo", PPO_CONFIG, [model, f"sft_adapter={sft_adapter}", f"reward=[{GOLD}]",
                                                        "ppo.critic=head", *ppo_steps],
                 processes=args.processes, strategy="fsdp"),
        ]
    return cases


# ---------------------------------------------------------------------------------------------------
# One case: plan, run, measure


def run_case(case: Case, out: Path, threads: int) -> dict:
    run_dir = out / case.key
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = out / f"{case.key}.log"
    result = {"case": case.name, "model": case.model, "stage": case.stage, "processes": case.processes,
              "strategy": case.strategy, "overrides": case.overrides}
    overrides = [*case.overrides, f"output_dir={run_dir}"]
    if case.stage == "runtime":
        result["plan"] = {"peak_mib": memory.RUNTIME_MIB["cpu"], "parts": [], "workload": None}
        command = [sys.executable, "-c", "import importlib, sys\n"
                   f"for name in {STAGE_IMPORTS!r}: importlib.import_module(name)\n"
                   "from rlft.runs import peak_rss_mb\nprint('peak_rss_mb', peak_rss_mb())"]
    else:
        result["plan"] = plan(case, overrides, out / f"{case.key}.plan.json", log)
        if result["plan"].get("problems"):
            result["error"] = "rlft plan: " + "; ".join(result["plan"]["problems"])
            result["measured"] = {}
            return result
        fsdp = str(CONFIGS / "accelerate" / "fsdp.yaml")
        launch = [sys.executable, "-m", "rlft"] if case.strategy != "fsdp" else [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", fsdp, "--num_processes",
            str(case.processes), "-m", "rlft"]
        command = [*launch, case.stage, "--config", case.config, *overrides]
    result["command"] = [Path(command[0]).name, *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // case.processes)), "PYTHONPATH": str(ROOT)}
    started = time.time()
    with open(log, "a") as stream:
        stream.write("+ " + " ".join(command[1:]) + "\n")
        stream.flush()
        code = run_tree(command, env, stream)
    result["measured"] = {"wall_s": time.time() - started, "returncode": code}
    if code != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        result["error"] = f"exit {code}, see {log}: " + " | ".join(line.strip()[:200] for line in tail)
        return result
    measured = result["measured"]
    if case.stage == "runtime":
        line = next(line for line in log.read_text().splitlines() if line.startswith("peak_rss_mb "))
        measured["peak_rss_mb"] = measured["largest_process_mb"] = float(line.split()[1])
        return result
    metrics = json.loads((run_dir / "metrics.json").read_text())
    measured["peak_rss_mb"] = metrics["peak_rss_mb"]
    measured["largest_process_mb"] = metrics.get("peak_rss_mb_largest_process", metrics["peak_rss_mb"])
    if "parameters_mb" in metrics:
        measured["parameters_mb"] = metrics["parameters_mb"]
    return result


def replan(results: dict, out: Path) -> None:
    """Each recorded case's plan again, from its recorded config and overrides (its measurements kept)."""
    for result in results["cases"]:
        if result["stage"] == "runtime" or "command" not in result:
            continue
        command = result["command"]
        case = Case(result["case"], result["model"], result["stage"], command[command.index("--config") + 1],
                    result["overrides"], result["processes"], result["strategy"])
        (out / case.model).mkdir(parents=True, exist_ok=True)
        overrides = [*case.overrides, f"output_dir={out / case.key}.replanned"]
        result["plan"] = plan(case, overrides, out / f"{case.key}.plan.json", out / f"{case.key}.replan.log")
        print(f"{case.key}: predicted {fmt(predicted_mib(result))} MiB, measured "
              f"{fmt(result['measured'].get('peak_rss_mb'))} MiB", flush=True)
    results["constants"] = constants()


def plan(case: Case, overrides: list[str], path: Path, log: Path) -> dict:
    """`rlft plan` of the case's run (the same config and overrides, this process: it loads no weights): its one
    stage's plan from --json, or its problems."""
    from rlft.cli import main as rlft

    args = ["plan", "--stage", case.stage, "--config", case.config, "--device", "cpu", "--processes",
            str(case.processes), "--strategy", case.strategy, "--json", str(path), *overrides]
    path.unlink(missing_ok=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            code = rlft(args)
        except Exception as e:  # a bug in the plan: this case fails, the others still run
            code = f"{type(e).__name__}: {e}"
    log.write_text("+ rlft " + " ".join(args) + "\n" + printed.getvalue() + "\n")
    if not path.is_file():
        return {"problems": [f"exit {code}: {printed.getvalue().strip().splitlines()[-1:]}"]}
    stage, = [entry for entry in json.loads(path.read_text())["stages"] if entry["stage"] == case.stage]
    if code != 0 and not stage["problems"]:
        stage["problems"] = [f"exit {code}"]
    return stage


def run_tree(command: list[str], env: dict, stream) -> int:
    """The exit code of `command`, run in its own process group (ended whole on Ctrl-C)."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        return process.wait()
    except BaseException:  # Ctrl-C: end the case's process group, not just its launcher
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        raise


# ---------------------------------------------------------------------------------------------------
# Predictions and the table


def constants() -> dict:
    return {key: getattr(memory, key) for key in ("RUNTIME_MIB", "FSDP_GATHERED_LAYERS", "DISTRIBUTED_MIB",
                                                  "CPU_DEQUANTIZED_SLACK", "CAUSAL_LM_LOSS_LOGIT_COPIES", "NF4_BITS")}


def workload_of(saved: dict) -> memory.Workload:
    """A plan's recorded workload (rlft plan --json) as rlft.memory's Workload again."""
    return memory.Workload(**{**saved, "model": memory.ModelShape(**saved["model"]),
                              "others": tuple(tuple(other) for other in saved["others"])})


def predicted_mib(case: dict) -> float | None:
    """The case's predicted peak per process under rlft/memory.py's constants as they are now."""
    planned = case.get("plan") or {}
    if case["stage"] == "runtime":
        return memory.RUNTIME_MIB["cpu"]
    if planned.get("workload") is None:
        return None
    return memory.peak(memory.parts(workload_of(planned["workload"]))) / memory.MIB


def phases(case: dict) -> dict[str, float]:
    """MiB per phase of the plan's parts now (always, forward, generate), and the always part's biggest pieces."""
    if not (case.get("plan") or {}).get("workload"):
        return {}
    found = memory.parts(workload_of(case["plan"]["workload"]))
    sums = {phase: sum(p.bytes for p in found if p.phase == phase) / memory.MIB
            for phase in ("always", "forward", "generate")}
    sums.update({p.key: p.bytes / memory.MIB for p in found if p.key in ("runtime", "weights")})
    return sums


def fmt(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def markdown(results: dict, source: str) -> str:
    s = results["settings"]
    lines = [
        f"`rlft plan`'s peak per process against measured peak RSS (`benchmarks/plan_memory.py`, {source}), on "
        f"{results['machine']}; {results['threads']} threads per case (split between FSDP's processes). "
        f"{s['sft_steps']} SFT steps, {s['reward_steps']} reward steps, {s['ppo_steps']} PPO step(s) of "
        f"{s['ppo_rows']} rows x {s['max_new_tokens']} new tokens per process"
        + (" (--tiny: a tiny random Llama)" if results.get("tiny") else "") + ".", "",
        "| Case | Model | Processes | Predicted | Measured (main process) | Largest process | Predicted / measured "
        "| Within ±20% |",
        "|---|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        measured, predicted = case["measured"].get("peak_rss_mb"), predicted_mib(case)
        ratio = predicted / measured if measured and predicted else None
        within = "failed" if case.get("error") else ("yes" if abs(ratio - 1) <= results["tolerance"] else "**no**")
        launch = f"{case['processes']} {case['strategy']}" if case["processes"] > 1 else "1"
        lines.append(f"| {case['case']} | {case['model']} | {launch} | {fmt(predicted)} MiB | {fmt(measured)} MiB | "
                     f"{fmt(case['measured'].get('largest_process_mb'))} MiB | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | {within} |")
    lines += ["", "The plan's parts (MiB, under the constants below): what is always held, of it the runtime and "
              "the base weights, and the two phases that never overlap.", "",
              "| Case | Model | Always | Runtime | Weights | Forward | Generate |", "|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        p = phases(case)
        if p:
            lines.append(f"| {case['case']} | {case['model']} | {fmt(p['always'])} | {fmt(p.get('runtime'))} | "
                         f"{fmt(p.get('weights'))} | {fmt(p['forward'])} | {fmt(p['generate'])} |")
    c = constants()
    lines += ["", "Constants of rlft/memory.py: " + ", ".join(f"{key}={value}" for key, value in c.items()) +
              ("" if c == results["constants"] else f" (the run was planned with {results['constants']})") + ". "
              "DISTRIBUTED_MIB and CPU_DEQUANTIZED_SLACK were set from the embedded model's ppo_fsdp and sft_qlora "
              "rows; the large model's rows are the check on them."]
    failed = [case for case in results["cases"] if case.get("error")]
    lines += [f"- {case['model']}/{case['case']} failed: {case['error']}" for case in failed]
    return "\n".join(lines) + "\n"


def write_table(results: dict, path: Path) -> None:
    text = markdown(results, str(path))
    path.with_suffix(".md").write_text(text)
    print(text)


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(results, str(path)))


if __name__ == "__main__":
    main()
