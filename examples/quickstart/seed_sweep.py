"""The quickstart over several seeds, thread counts and dtypes: every headline figure's mean and spread.

    python examples/quickstart/seed_sweep.py   # seeds 0-4 on 2 threads, seed 0 in float32, seed 0 on 1 thread

Each run is `rlft pipeline --config configs/quickstart.yaml seed=S output_dir=<out>/seed<S>_threads<T>[_<dtype>]`
under OMP_NUM_THREADS=T (and every stage's model.dtype=<dtype> when a run names one: SEED:THREADS:DTYPE); a
run whose folder already holds its report is read, not rerun (`--redo` reruns
it: the pipeline then skips its finished training stages and redoes the report). The figures of each run, their mean, std, min
and max, and whether each run meets the quickstart's bars, go to examples/quickstart/results/seed_sweep.json and
seed_sweep.md, and the table into README.md between its `<!-- seed_sweep -->` markers (the README's
quickstart figures). `--table-only` rewrites the .md and the README from the .json. Arguments after `--`
go to every pipeline run (the tests use that for tiny models).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from rlft.results import machine, write_between_markers

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"

MARKERS = ("<!-- seed_sweep: written by examples/quickstart/seed_sweep.py -->", "<!-- /seed_sweep -->")
HEADLINE = ("<!-- headline: written by examples/quickstart/seed_sweep.py -->", "<!-- /headline -->")
# The quickstart's bars: (figure, test, wording); every run must meet them, but the time bar, which is the
# README's command as it ships (model.dtype auto) on a 2-core machine's 2 threads: float32 and 1 thread are
# there to show the KL and the outcome hold on other arithmetic, not to be as fast.
BARS = [
    ("reward_model_accuracy", lambda v: v >= 0.75, "reward model held-out accuracy >= 75%"),
    ("reward_model_eval_pairs", lambda v: v >= 300, "on >= 300 pairs"),
    ("proxy_win_rate", lambda v: v > 0.65, "PPO beats SFT under the proxy: win rate > 65%"),
    ("proxy_win_rate_ci_low", lambda v: v > 0.55, "... and the 95% CI above 55%"),
    ("gold_win_rate", lambda v: v > 0.65, "PPO beats SFT under gold: win rate > 65%"),
    ("gold_win_rate_ci_low", lambda v: v > 0.55, "... and the 95% CI above 55%"),
    ("eval_prompts", lambda v: v >= 200, "on >= 200 held-out prompts"),
    ("kl_over_target", lambda v: 0.75 <= v <= 1.25, "exact KL within 0.75x-1.25x of the target"),
    ("length_ratio", lambda v: v >= 0.6, "no collapse: length >= 0.6x SFT's"),
    ("distinct_1_ratio", lambda v: v >= 0.75, "... and distinct-1 >= 0.75x SFT's"),
]
TIME_BAR = ("wall_time_min", lambda v: v <= 13, "all five stages in <= 13 minutes on 2 threads")


def bars_missed(run: dict) -> list[str]:
    bars = BARS + ([TIME_BAR] if (run["threads"], run.get("dtype", "auto")) == (2, "auto") else [])
    return [wording for key, test, wording in bars if not test(run[key])]

DEFAULT_RUNS = ["0:2", "1:2", "2:2", "3:2", "4:2", "0:2:float32", "0:1"]


def parse_run(text: str) -> tuple[int, int, str]:
    """SEED[:THREADS[:DTYPE]] -> (seed, threads (default 2), dtype ('' for the config's own))."""
    seed, threads, dtype = (text.split(":") + ["", ""])[:3]
    return int(seed), int(threads or 2), dtype


def folder_name(seed: int, threads: int, dtype: str) -> str:
    return f"seed{seed}_threads{threads}" + (f"_{dtype}" if dtype else "")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in DEFAULT_RUNS],
                        metavar="SEED:THREADS[:DTYPE]", help=f"runs (default {' '.join(DEFAULT_RUNS)})")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="runs/seed_sweep", help="one pipeline folder per run here")
    parser.add_argument("--table", default=str(RESULTS / "seed_sweep"),
                        help="write <table>.json and <table>.md")
    parser.add_argument("--redo", action="store_true", help="rerun the pipeline of runs that have a report")
    parser.add_argument("--readme", default=str(ROOT / "examples" / "quickstart" / "README.md"),
                        help="write the table between its markers here (the results page)")
    parser.add_argument("--headline", default=str(ROOT / "README.md"),
                        help="write the one-paragraph summary between its markers here (the front door)")
    parser.add_argument("--table-only", action="store_true", help="only rewrite <table>.md and the README from .json")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.table_only:
        sweep = json.loads(Path(args.table).with_suffix(".json").read_text())
        return write(sweep, args)

    runs = []
    for seed, threads, dtype in args.runs:
        folder = Path(args.out) / folder_name(seed, threads, dtype)
        dtypes = [f"{stage}.model.dtype={dtype}" for stage in ("sft", "reward")] if dtype else []
        command = [sys.executable, "-m", "rlft", "pipeline", "--config", args.config, f"seed={seed}",
                   f"output_dir={folder}", *dtypes, *extra]
        if args.redo or not (folder / "eval" / "report.json").is_file():
            print("+ OMP_NUM_THREADS=%d rlft %s" % (threads, " ".join(command[3:])), flush=True)
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        runs.append({"seed": seed, "threads": threads, "dtype": dtype or "auto", "folder": str(folder),
                     **figures(folder)})
        runs[-1]["bars_missed"] = bars_missed(runs[-1])
    table = Path(args.table).resolve()
    sweep = {"config": args.config, "overrides": extra, "machine": machine(), "commit": commit(),
             "table": str(table.relative_to(ROOT) if table.is_relative_to(ROOT) else table),
             "runs": runs, "summary": summarise(runs)}
    if not extra:  # the README shows the first run's own plots
        for plot in ("training.png", "overoptimization.png"):
            shutil.copyfile(Path(runs[0]["folder"]) / "eval" / plot, Path(args.table).parent / plot)
    Path(args.table).with_suffix(".json").write_text(json.dumps(sweep, indent=2) + "\n")
    return write(sweep, args)


def commit() -> str:
    """The code the runs ran: the commit of the sweep's checkout, and whether files it tracks were changed (other
    than what the sweep writes itself, which changes as its runs finish)."""
    def git(*args):  # Popen, not run: the tests stand in for subprocess.run to catch a rerun pipeline
        with subprocess.Popen(["git", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) as process:
            return process.communicate()[0].strip()
    own = [f":(exclude){path}" for path in ("examples/quickstart/results", "examples/quickstart/README.md", "README.md")]
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", *own)
    return git("rev-parse", "--short", "HEAD") + (" (changed)" if changed else "")


def write(sweep: dict, args) -> dict:
    for run in sweep["runs"]:  # from the figures, so that the bars a table shows are today's
        run["bars_missed"] = bars_missed(run)
    Path(args.table).with_suffix(".md").write_text(markdown(sweep))
    if args.readme and Path(args.readme).is_file():
        write_between_markers(Path(args.readme), MARKERS, markdown(sweep))
    if args.headline and Path(args.headline).is_file():
        write_between_markers(Path(args.headline), HEADLINE, headline(sweep))
    print(markdown(sweep))
    return sweep


def figures(folder: Path) -> dict:
    """The headline figures of one finished pipeline folder: its reward model, and PPO against SFT."""
    reward = json.loads((folder / "reward" / "metrics.json").read_text())
    report = json.loads((folder / "eval" / "report.json").read_text())
    # the PPO stage's policy, by the stage folder it sits in (a run folder may have been moved since)
    ppo = next(p for p in report["policies"] if Path(p["path"]).parent.name == "ppo" or Path(p["path"]).name == "ppo")
    target = yaml.safe_load((folder / "ppo" / "config.yaml").read_text())["ppo"]["target_kl"]
    ppo_summary = json.loads((folder / "ppo" / "metrics.json").read_text())
    proxy, gold = ppo["rewards"][report["proxy"]]["win_rate"], ppo["rewards"][report["gold"]]["win_rate"]
    timings = json.loads((folder / "pipeline.json").read_text())["stage_wall_time_s"]
    found = {
        "reward_model_accuracy": reward["eval_accuracy_after"], "reward_model_eval_pairs": reward["eval_rows"],
        "eval_prompts": report["prompts"]["count"],
        "proxy_win_rate": proxy["mean"], "proxy_win_rate_ci_low": proxy["ci95"][0],
        "gold_win_rate": gold["mean"], "gold_win_rate_ci_low": gold["ci95"][0],
        "kl_exact": ppo["kl"]["exact"]["mean"], "target_kl": target, "kl_over_target": ppo["kl"]["exact"]["mean"] / target,
        "length": ppo["response"]["policy"]["length"]["mean"],
        "reference_length": ppo["response"]["reference"]["length"]["mean"],
        # mode collapse (one reply for every prompt) wins under a rule judge too: the bars cannot see it
        "distinct_1": ppo["hacking"]["diversity"]["policy"]["distinct_1"],
        "reference_distinct_1": ppo["hacking"]["diversity"]["reference"]["distinct_1"],
        "wall_time_min": sum(timings.values()) / 60,
        "stage_minutes": {stage: seconds / 60 for stage, seconds in timings.items()},
        "result_step": ppo_summary.get("result_step"),
        "result_scale": ppo_summary.get("result_scale", 1.0),  # the factor on its update (rlft/ppo/scale.py)
        # the sampler's log-probs against PPO's recomputed ones, per token, averaged over the steps (bf16 vs float32)
        **sampler_gap(folder / "ppo" / "metrics.jsonl"),
        "stages_timed": len(timings),  # fewer than five: a stopped run's finished stages, reused without their times
    }
    found["length_ratio"] = found["length"] / found["reference_length"]
    found["distinct_1_ratio"] = found["distinct_1"] / found["reference_distinct_1"]
    return found


def sampler_gap(metrics_jsonl: Path) -> dict:
    steps = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    return {key: statistics.fmean(step[f"sampler/logprob_gap_{part}"] for step in steps)
            for key, part in (("sampler_gap_mean", "mean"), ("sampler_gap_kl", "kl"))}


def summarise(runs: list[dict]) -> dict:
    keys = [key for key, value in runs[0].items() if isinstance(value, (int, float)) and not isinstance(value, bool)
            and key not in ("seed", "threads", "result_step", "result_scale")]
    return {key: {"mean": statistics.fmean(r[key] for r in runs),
                  "std": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0,
                  "min": min(r[key] for r in runs), "max": max(r[key] for r in runs)} for key in keys}


def headline(sweep: dict) -> str:
    """The front door's one paragraph: over every run, the mean and range of the figures that matter."""
    runs, summary = sweep["runs"], sweep["summary"]

    def span(key, fmt):
        return f"{fmt.format(summary[key]['mean'])} ({fmt.format(summary[key]['min'])}-{fmt.format(summary[key]['max'])})"
    met = sum(not run["bars_missed"] for run in runs)
    threads = " and ".join(str(t) for t in sorted({r["threads"] for r in runs}, reverse=True))
    dtypes = " and ".join(sorted({r.get("dtype", "auto") for r in runs}))
    return (f"Over {len(runs)} quickstart runs (seeds {', '.join(str(s) for s in sorted({r['seed'] for r in runs}))}; "
            f"{threads} threads; model.dtype {dtypes}) on {sweep.get('machine', 'this machine')}, PPO's result beats the "
            f"SFT model on {runs[0]['eval_prompts']:.0f} held-out prompts with a gold (VADER) win rate of "
            f"{span('gold_win_rate', '{:.0%}')} and a proxy win rate of {span('proxy_win_rate', '{:.0%}')}, mean "
            f"(range), at an exact KL of {span('kl_over_target', '{:.2f}')}x its target, with replies "
            f"{span('length_ratio', '{:.2f}')}x as long as SFT's and distinct-1 {span('distinct_1_ratio', '{:.2f}')}x "
            f"SFT's; the reward model's held-out accuracy is {span('reward_model_accuracy', '{:.3f}')}, and all five "
            f"stages take {span('wall_time_min', '{:.1f}')} minutes. Every bar is met on {met} of {len(runs)} runs. "
            "Each run's row: [examples/quickstart/README.md](examples/quickstart/README.md).\n")


def markdown(sweep: dict) -> str:
    columns = [("reward_model_accuracy", "RM accuracy", "{:.3f}"), ("reward_model_eval_pairs", "RM pairs", "{:.0f}"),
               ("proxy_win_rate", "proxy win", "{:.0%}"), ("proxy_win_rate_ci_low", "proxy CI low", "{:.0%}"),
               ("gold_win_rate", "gold win", "{:.0%}"), ("gold_win_rate_ci_low", "gold CI low", "{:.0%}"),
               ("kl_exact", "exact KL", "{:.2f}"), ("kl_over_target", "KL / target", "{:.2f}"),
               ("length_ratio", "length / SFT", "{:.2f}"), ("distinct_1_ratio", "distinct-1 / SFT", "{:.2f}"),
               ("sampler_gap_mean", "sampler gap", "{:.1e}"), ("wall_time_min", "minutes", "{:.1f}")]
    runs = sweep["runs"]
    described = ", ".join(f"seed {r['seed']} on {r['threads']} thread{'s' if r['threads'] > 1 else ''}"
                          + (f" in {r['dtype']}" if r.get("dtype", "auto") != "auto" else "") for r in runs)
    lines = [f"`{sweep['config']}`, {described}, on {sweep.get('machine', 'this machine')}. PPO's result against "
             f"the SFT model it started from on {runs[0]['eval_prompts']:.0f} held-out prompts (proxy: the run's reward "
             "model; gold: VADER; CI low: the 95% interval's lower end); reward model accuracy on its held-out pairs "
             "(RM pairs, prompts it never saw); exact KL summed over the response, and over ppo.target_kl; mean length "
             "in tokens and distinct-1 (distinct words / words, over all replies) of PPO's replies over SFT's; sampler gap: "
             "mean |sampler log-prob - PPO's recomputed log-prob| per token over PPO's steps; minutes: all five stages; "
             "result: the PPO step shipped, times the factor on its update where it was scaled onto the KL target "
             "(ppo.max_result_scale). Code: commit "
             f"{sweep.get('commit', 'not recorded')}. Written by examples/quickstart/seed_sweep.py from "
             f"{sweep.get('table', 'examples/quickstart/results/seed_sweep')}.json.",
             "",
             "| seed | threads | dtype | " + " | ".join(title for _, title, _ in columns) + " | result | bars missed |",
             "|---|---|---|" + "---|" * len(columns) + "---|---|"]
    for run in sweep["runs"]:
        lines.append(f"| {run['seed']} | {run['threads']} | {run.get('dtype', 'auto')} | "
                     + " | ".join(fmt.format(run[key]) for key, _, fmt in columns) + f" | {result(run)}"
                     + f" | {'; '.join(run['bars_missed']) or 'none'} |")
    summary = sweep["summary"]
    lines.append("| mean ± std | | | " + " | ".join(
        f"{fmt.format(summary[key]['mean'])} ± {fmt.format(summary[key]['std'])}" for key, _, fmt in columns) + " | | |")
    lines += [f"\nSeed {r['seed']} on {r['threads']} threads: minutes of {r['stages_timed']} stages, the others' "
              "times lost to a stopped run." for r in runs if r.get("stages_timed", 5) < 5]
    return "\n".join(lines) + "\n"


def result(run: dict) -> str:
    """The PPO step shipped, and the factor on its update where PPO scaled it onto the KL target."""
    scale = run.get("result_scale", 1.0)
    return f"step {run.get('result_step', '?')}" + (f" x {scale:.3g}" if scale != 1.0 else "")


if __name__ == "__main__":
    main()
