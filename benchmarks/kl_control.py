"""How well PPO holds its KL target: the PPO stage of finished quickstarts under variants of its KL control.

    python benchmarks/kl_control.py --runs runs/seed_sweep/seed0_threads2 runs/seed_sweep/seed1_threads2 \
        --variant shipped= --variant no_trust_region=ppo.max_update_kl=0 \
        --json benchmarks/results/kl_control.json --plot benchmarks/results/kl_control.png

Each run is a finished pipeline folder of `--config` (its SFT and reward models), optionally `:SEED` for PPO's
seed (default: the pipeline's own; another seed also draws another hold-out split for PPO's prompts, so some of
eval's held-out prompts were PPO's training prompts). Each variant is a name and space-separated `rlft ppo`
overrides (empty: the shipped defaults). For each variant and run: `rlft ppo` as the pipeline wires it (its
SFT adapter, reward model, data and model settings), then (unless --no-eval) `rlft eval` of the run's result on
the pipeline's held-out prompts (exact KL, proxy and gold win rates over the SFT model).
Writes the per-step curves (exact KL, sampled KL, beta, the update's approx-KL and whether it stopped early),
a table of the final KL against the target band, and a plot of the exact-KL curves. A run whose folder already
holds its result is read, not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

# every rlft module this script reads, imported now: a long comparison must not mix two versions of the code
from rlft.config import load_config
from rlft.data import load_splits, prompts_of
from rlft.pipeline import PipelineConfig, wire
from rlft.ppo.config import PPOConfig
from rlft.ppo.train import MEASURED_BATCHES, prompt_batch
from rlft.results import machine

ROOT = Path(__file__).resolve().parents[1]
BAND = (0.75, 1.25)  # the final exact KL over the target that counts as held


def rlft(*args: str) -> None:
    print("+ rlft", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "rlft", *args], cwd=ROOT, check=True)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name, overrides.split()


def ppo_config_file(pipeline: Path, config: str, seed: int, folder: Path) -> Path:
    """The PPO stage's config as `rlft pipeline --config <config>` wires it for this pipeline folder, as YAML."""
    from dataclasses import asdict

    pipeline_seed = yaml.safe_load((pipeline / "config.yaml").read_text())["seed"]
    wired = asdict(wire(load_config(PipelineConfig, ROOT / config, [f"output_dir={pipeline}",
                                                                     f"seed={pipeline_seed}"]))["ppo"])
    wired["seed"] = seed
    wired["ppo"]["kl_budget"] = 0.0  # derived from the target again, which a variant may change
    folder.mkdir(parents=True, exist_ok=True)
    path = folder.with_name(folder.name + "_ppo.yaml")
    path.write_text(yaml.safe_dump(wired, sort_keys=False))
    return path


def validation_file(run_dir: Path, count: int = 200) -> Path:
    """`count` prompts of the PPO run's own training split that it never drew (in its steps or its final
    measurement), as a jsonl: validation prompts, never the held-out ones."""
    config = load_config(PPOConfig, run_dir / "config.yaml")
    hp = config.ppo
    train, _, _ = load_splits(config.data, ("prompt_only", "conversational"), config.seed, "prompt data")
    prompts = prompts_of(train)
    drawn = {i for step in range(hp.steps + MEASURED_BATCHES)
             for i in prompt_batch(step, 0, 1, hp.prompts_per_rollout, len(prompts), config.seed)}
    unseen = [prompts[i] for i in range(len(prompts)) if i not in drawn][:count]
    path = run_dir.with_name(run_dir.name + "_validation.jsonl")
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in unseen))
    return path


def run_one(pipeline: Path, seed: int | None, run_dir: Path, overrides: list[str], evaluate: bool,
            config: str, validation: bool) -> dict:
    pipeline_seed = yaml.safe_load((pipeline / "config.yaml").read_text())["seed"]
    seed = pipeline_seed if seed is None else seed
    proxy = f"{{name: proxy, kind: model, path: {pipeline / 'reward'}, normalize: true}}"
    # eval.KEY=VALUE goes to rlft eval (e.g. sampling the evaluation as the variant trained), the rest to rlft ppo
    eval_overrides = [o.removeprefix("eval.") for o in overrides if o.startswith("eval.")]
    ppo_overrides = [o for o in overrides if not o.startswith("eval.")]
    if not (run_dir / "metrics.json").is_file():
        rlft("ppo", "--config", str(ppo_config_file(pipeline, config, seed, run_dir)), f"output_dir={run_dir}",
             *ppo_overrides)
    eval_dir = run_dir.with_name(run_dir.name + ("_validation" if validation else "_eval"))
    # held out: the pipeline's hold-out split; validation: training prompts this PPO run never drew
    data = (f"data={{path: {validation_file(run_dir)}, eval_split: train}}" if validation
            else "data={path: chatterbot, eval_fraction: 0.2}")
    # the evaluation samples as this PPO run sampled (the pipeline requires the same)
    sampled = yaml.safe_load((run_dir / "config.yaml").read_text())["sampling"]
    as_trained = [f"sampling.{key}={sampled[key]}" for key in ("temperature", "min_new_tokens")]
    if evaluate and not (eval_dir / "report.json").is_file():
        rlft("eval", "--config", "configs/eval.yaml", f"output_dir={eval_dir}", f"policies=[{run_dir}]",
             "checkpoints_of=", f"training_run={run_dir}", "num_samples_shown=0", "num_prompts=200",
             "batch_size=64", data, f"seed={pipeline_seed}",
             f"scorers=[{proxy}, {{name: gold, kind: function, path: 'reward_models.judges:sentiment'}}]",
             *as_trained, *eval_overrides)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "metrics.json").read_text())
    hp = yaml.safe_load((run_dir / "config.yaml").read_text())["ppo"]
    found = {
        "pipeline": str(pipeline), "seed": seed, "split_seed": pipeline_seed, "target_kl": hp["target_kl"],
        "kl_budget": hp["kl_budget"],
        "kl": [s["objective/kl"] for s in steps], "kl_sampled": [s.get("objective/kl_sampled") for s in steps],
        "kl_coef": [s["objective/kl_coef"] for s in steps],
        "approxkl": [s.get("policy/approxkl") for s in steps],
        "update_stopped": [s.get("policy/update_stopped") for s in steps],
        "sampler_gap": [s.get("sampler/logprob_gap_mean") for s in steps],
        "result_step": summary.get("result_step"), "result_kl": summary.get("result_kl"),
        "result_kl_upper": summary.get("result_kl_upper"), "checkpoint_kl": summary.get("checkpoint_kl"),
        "checkpoint_kl_upper": summary.get("checkpoint_kl_upper"),
    }
    if evaluate:
        policy = json.loads((eval_dir / "report.json").read_text())["policies"][0]
        found.update({
            "eval_kl_exact": policy["kl"]["exact"]["mean"], "eval_kl_over_target": policy["kl"]["exact"]["mean"]
            / hp["target_kl"], "proxy_win_rate": policy["rewards"]["proxy"]["win_rate"]["mean"],
            "gold_win_rate": policy["rewards"]["gold"]["win_rate"]["mean"],
            "length_ratio": policy["response"]["policy"]["length"]["mean"]
            / policy["response"]["reference"]["length"]["mean"],
            "distinct_1_ratio": policy["hacking"]["diversity"]["policy"]["distinct_1"]
            / policy["hacking"]["diversity"]["reference"]["distinct_1"],
        })
    return found


def markdown(results: dict) -> str:
    lines = [f"PPO stage of {', '.join(f'`{p}`' for p in results['pipelines'])} (each its SFT and reward models; "
             f"`{results['config']}`), {results['machine']}, "
             f"{results['threads']} threads. Final KL: the result's exact KL on 200 {results['prompts']} prompts (rlft eval) over "
             f"the target; in band: within {BAND[0]}x-{BAND[1]}x. Peak: the largest per-step exact KL of the rollouts "
             "over the target. Written by benchmarks/kl_control.py.", "",
             "| variant | overrides | seeds | final KL / target | in band | peak KL / target | result step | "
             "updates stopped early | proxy win | gold win | length / SFT | distinct-1 / SFT |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, variant in results["variants"].items():
        runs = variant["runs"]

        def spread(key, fmt="{:.2f}"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if not values:
                return "-"
            mean = statistics.fmean(values)
            return f"{fmt.format(mean)} ± {fmt.format(statistics.stdev(values))}" if len(values) > 1 else fmt.format(mean)
        for run in runs:
            run["peak_over_target"] = max(run["kl"]) / run["target_kl"]
            run["stopped_share"] = statistics.fmean(s or 0.0 for s in run["update_stopped"])
        in_band = sum(BAND[0] <= r.get("eval_kl_over_target", -1) <= BAND[1] for r in runs)
        lines.append(
            f"| {name} | `{' '.join(variant['overrides']) or '(defaults)'}` | {len(runs)} | "
            f"{spread('eval_kl_over_target')} | {in_band}/{len(runs)} | {spread('peak_over_target')} | "
            f"{', '.join(str(r['result_step']) for r in runs)} | {spread('stopped_share', '{:.0%}')} | "
            f"{spread('proxy_win_rate', '{:.0%}')} | {spread('gold_win_rate', '{:.0%}')} | "
            f"{spread('length_ratio')} | {spread('distinct_1_ratio')} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    figure, axes = plt.subplots(2, len(variants), figsize=(4 * len(variants), 6), squeeze=False, sharey="row")
    for column, (name, variant) in enumerate(variants.items()):
        for run in variant["runs"]:
            steps = range(1, len(run["kl"]) + 1)
            label = f"seed {run['seed']}" + ("" if run["seed"] == run["split_seed"] else f" (split {run['split_seed']})")
            axes[0, column].plot(steps, [kl / run["target_kl"] for kl in run["kl"]], label=label)
            axes[1, column].plot(steps, run["kl_coef"], label=label)
        axes[0, column].axhspan(*BAND, color="green", alpha=0.1)
        axes[0, column].set_title(name)
        axes[1, column].set_xlabel("PPO step")
        axes[1, column].set_yscale("log")
    axes[0, 0].set_ylabel("exact KL of the rollout / target")
    axes[1, 0].set_ylabel("beta")
    axes[0, 0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["runs/quickstart"], metavar="PIPELINE[:SEED]",
                        help="finished pipeline folders, each with an optional PPO seed (default: its own)")
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the pipelines' config")
    parser.add_argument("--variant", action="append", type=parse_variant, metavar="NAME=OVERRIDES",
                        help="a variant: its name, '=', then rlft ppo overrides, and rlft eval's as eval.KEY=VALUE "
                             "(repeatable; default: shipped=)")
    parser.add_argument("--out", default="runs/kl_control", help="one PPO run (and report) per variant and run here")
    parser.add_argument("--no-eval", action="store_true", help="skip rlft eval (curves and PPO's own KL only)")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on training prompts PPO never drew instead of the held-out ones (to choose a "
                             "design without looking at the held-out prompts)")
    parser.add_argument("--json", help="write the results here (and the table beside it as .md)")
    parser.add_argument("--plot", help="write the exact-KL and beta curves here (png)")
    args = parser.parse_args()
    runs = [(Path(folder), int(seed) if seed else None) for folder, _, seed in (r.partition(":") for r in args.runs)]
    out = Path(args.out)
    results = {"pipelines": [str(p) for p, _ in runs], "config": args.config, "argv": sys.argv[1:],
               "prompts": "validation (training prompts PPO never drew)" if args.validation else "held out",
               "machine": machine(), "threads": os.environ.get("OMP_NUM_THREADS", "all"), "variants": {}}
    for name, overrides in args.variant or [("shipped", [])]:
        found = [run_one(pipeline, seed, out / f"{name}_{pipeline.name}{'' if seed is None else f'_seed{seed}'}",
                         overrides, not args.no_eval, args.config, args.validation) for pipeline, seed in runs]
        results["variants"][name] = {"overrides": overrides, "runs": found}
        print(markdown(results), flush=True)
        if args.json:  # after every variant: a stopped comparison keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            Path(args.json).with_suffix(".md").write_text(markdown(results))
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
