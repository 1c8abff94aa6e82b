"""Every shipped quickstart variant on the same SFT models and pairs, for several seeds, in one table.

    python examples/quickstart/estimators.py --seeds 0 1

For each seed S:
1. the quickstart itself, `rlft pipeline --config configs/quickstart.yaml seed=S` in
   runs/seed_sweep/seedS_threads2 (examples/quickstart/seed_sweep.py's folder: a finished one is reused);
2. each variant config (GRPO as Dr. GRPO, RLOO, the one-base quickstart with its SmolLM2 reward adapter, and
   std-scaled GRPO, not shipped, to compare) as a pipeline reusing that folder's SFT model and pairs (and, but for one-base, its reward
   model), in runs/estimators/seedS/<variant>;
3. one `rlft eval` of all their PPO results on the seed's held-out prompts, scored by both reward models and
   VADER (gold): runs/estimators/seedS/eval/report.json. Each variant's proxy is the reward model it trained on.
Then the table (per seed and variant: win rates over the SFT model, exact KL over the target, length and
distinct-1 over the SFT model's, collapse warnings, the PPO stage's minutes, the bars each misses) goes to
examples/quickstart/results/estimators.{json,md} and into the results page (examples/quickstart/README.md) between its
`<!-- estimators -->` markers.
Finished stages are reused, so a rerun redoes only the reports and the table; `--table-only` redoes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

from rlft.results import machine, write_between_markers

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = ROOT / "examples" / "quickstart" / "README.md"  # the results page
MARKERS = ("<!-- estimators: written by examples/quickstart/estimators.py -->", "<!-- /estimators -->")


class Variant(NamedTuple):
    config: str
    proxy: str  # the scorer it trained against
    reused: str | None  # pipeline stages it reuses from the seed's quickstart (None: it is the quickstart)
    folder: str  # under runs/estimators/seed<S>/
    overrides: tuple[str, ...] = ()
    shipped: bool = True  # a PPO-loop config users get, held to the bars; else a row to compare with
    stage: str = "ppo"  # the stage that trains it


VARIANTS = {
    # every estimator's result as trained: the quickstart's scaling onto the KL target is measured by its sweep
    "PPO (critic, GAE)": Variant("configs/quickstart.yaml", "minilm", None, "", ("ppo.ppo.max_result_scale=0",)),
    "Dr. GRPO": Variant("configs/quickstart_grpo.yaml", "minilm", "[sft,preferences,reward]", "quickstart_grpo"),
    # DeepSeekMath's GRPO divides by the group's score std: not shipped, it does no better than Dr. GRPO here
    "GRPO, std-scaled (not shipped)": Variant("configs/quickstart_grpo.yaml", "minilm", "[sft,preferences,reward]",
                                              "quickstart_grpo_std", ("ppo.ppo.scale_by_std=true",), shipped=False),
    "RLOO": Variant("configs/quickstart_rloo.yaml", "minilm", "[sft,preferences,reward]", "quickstart_rloo"),
    "one base (SmolLM2 reward adapter, adapter critic)": Variant("configs/quickstart_one_base.yaml", "smollm2",
                                                                 "[sft,preferences]", "quickstart_one_base"),
    # DPO on the same pairs from the same SFT model: no reward model, no sampling, no KL target (held to no bar)
    "DPO": Variant("configs/quickstart_dpo.yaml", "minilm", "[sft,preferences,reward]", "quickstart_dpo",
                   shipped=False, stage="dpo"),
}
BARS = [  # issue's bars for every shipped variant: (figure, test, wording)
    ("proxy_win_rate", lambda v: v > 0.6, "proxy win > 60%"),
    ("gold_win_rate", lambda v: v > 0.6, "gold win > 60%"),
    ("length_ratio", lambda v: v >= 0.6, "length >= 0.6x SFT's"),
    ("distinct_1_ratio", lambda v: v >= 0.75, "distinct-1 >= 0.75x SFT's"),
    ("kl_over_target", lambda v: 0.5 <= v <= 1.5, "exact KL within 0.5x-1.5x of the target"),
]


def pipeline_dir(label: str, seed: int) -> Path:
    if VARIANTS[label].reused is None:
        return ROOT / "runs" / "seed_sweep" / f"seed{seed}_threads2"
    return ROOT / "runs" / "estimators" / f"seed{seed}" / VARIANTS[label].folder


def rlft(*args: str) -> None:
    print("+ rlft", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "rlft", *args], cwd=ROOT, check=True)


def run_seed(seed: int) -> Path:
    quickstart = pipeline_dir("PPO (critic, GAE)", seed)
    rlft("pipeline", "--config", "configs/quickstart.yaml", f"seed={seed}", f"output_dir={quickstart}",
         *VARIANTS["PPO (critic, GAE)"].overrides)
    for label, variant in VARIANTS.items():
        if variant.reused is None:
            continue
        rlft("pipeline", "--config", variant.config, f"seed={seed}", f"output_dir={pipeline_dir(label, seed)}",
             f"reuse_from={quickstart}", f"reuse_stages={variant.reused}",
             f"stages=[sft,preferences,reward,{variant.stage}]", *variant.overrides)
    report = ROOT / "runs" / "estimators" / f"seed{seed}" / "eval"
    one_base = pipeline_dir("one base (SmolLM2 reward adapter, adapter critic)", seed)
    rlft("eval", "--config", "configs/eval.yaml", f"output_dir={report}", f"seed={seed}", "checkpoints_of=",
         f"policies=[{', '.join(str(pipeline_dir(label, seed) / v.stage) for label, v in VARIANTS.items())}]",
         f"training_run={quickstart / 'ppo'}", "num_prompts=200", "batch_size=64", "num_samples_shown=4",
         "data={path: chatterbot, eval_fraction: 0.2}",
         f"scorers=[{{name: minilm, kind: model, path: {quickstart / 'reward'}, normalize: true}}, "
         f"{{name: smollm2, kind: model, path: {one_base / 'reward'}, normalize: true}}, "
         "{name: gold, kind: function, path: 'reward_models.judges:sentiment'}]")
    return report / "report.json"


def rows_of(seed: int) -> list[dict]:
    report = json.loads((ROOT / "runs" / "estimators" / f"seed{seed}" / "eval" / "report.json").read_text())
    rows = []
    for label, variant in VARIANTS.items():
        folder, proxy = pipeline_dir(label, seed), variant.proxy
        trained = (folder / variant.stage).resolve()
        policy = next((p for p in report["policies"] if trained in (Path(p["path"]).resolve().parent,
                                                                    Path(p["path"]).resolve())), None)
        if policy is None:  # a variant added after this seed's report was made: no row until it is rerun
            continue
        # DPO has no KL target: its KL is set against the quickstart PPO's
        target = yaml.safe_load((pipeline_dir("PPO (critic, GAE)", seed) / "ppo" / "config.yaml").read_text())["ppo"][
            "target_kl"] if variant.stage != "ppo" else yaml.safe_load((folder / "ppo" / "config.yaml").read_text())[
            "ppo"]["target_kl"]
        response, diversity = policy["response"], policy["hacking"]["diversity"]
        row = {
            "seed": seed, "variant": label, "proxy": proxy,
            "proxy_win_rate": policy["rewards"][proxy]["win_rate"]["mean"],
            "proxy_win_rate_ci": policy["rewards"][proxy]["win_rate"]["ci95"],
            "gold_win_rate": policy["rewards"]["gold"]["win_rate"]["mean"],
            "gold_win_rate_ci": policy["rewards"]["gold"]["win_rate"]["ci95"],
            "kl_exact": policy["kl"]["exact"]["mean"], "target_kl": target,
            "kl_over_target": policy["kl"]["exact"]["mean"] / target,
            "length_ratio": response["policy"]["length"]["mean"] / response["reference"]["length"]["mean"],
            "distinct_1_ratio": diversity["policy"]["distinct_1"] / diversity["reference"]["distinct_1"],
            "collapse": policy["hacking"]["collapse"]["warnings"],
            "stage_minutes": json.loads((folder / "pipeline.json").read_text())["stage_wall_time_s"].get(
                variant.stage, 0) / 60,
            "prompts": report["prompts"]["count"],
        }
        row["shipped"] = variant.shipped
        row["bars_missed"] = [wording for key, test, wording in BARS if not test(row[key])] if variant.shipped \
            else ["(compared only: " + ("DPO, no KL target" if variant.stage == "dpo" else "not shipped") + ")"]
        rows.append(row)
    return rows


def markdown(table: dict) -> str:
    lines = [f"Each shipped quickstart variant's PPO result (and std-scaled GRPO's, not shipped, and DPO's on the same "
             f"pairs, to compare) against the SFT model it started from, on "
             f"{table['rows'][0]['prompts']} held-out prompts per seed ({table['machine']}, {table['threads']} threads): "
             "win rates (95% CI) under the reward model it trained on (proxy) and VADER (gold), exact KL over "
             "`ppo.target_kl` (DPO's over the quickstart PPO's), mean length and distinct-1 over the SFT model's, "
             "collapse warnings (rlft.hacking), the minutes of the stage that trained it (PPO or DPO). Every variant of a seed shares its SFT model and pairs. Written by "
             "examples/quickstart/estimators.py from runs/estimators/seed*/eval/report.json.", "",
             "| seed | variant | proxy win | gold win | KL / target | length / SFT | distinct-1 / SFT | collapse | "
             "stage minutes | bars missed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        win = lambda key: f"{row[key]:.0%} ({row[key + '_ci'][0]:.0%}-{row[key + '_ci'][1]:.0%})"  # noqa: E731
        lines.append(f"| {row['seed']} | {row['variant']} | {win('proxy_win_rate')} | {win('gold_win_rate')} | "
                     f"{row['kl_over_target']:.2f} | {row['length_ratio']:.2f} | {row['distinct_1_ratio']:.2f} | "
                     f"{'; '.join(row['collapse']) or 'none'} | {row['stage_minutes']:.1f} | "
                     f"{'; '.join(row['bars_missed']) or 'none'} |")
    return "\n".join(lines) + "\n"


def ci(stats: dict, percent: bool = False) -> str:
    """'mean ± half-width' of a {mean, ci95} summary."""
    half = stats["mean"] - stats["ci95"][0]
    return f"{stats['mean']:.0%} ± {half:.0%}" if percent else f"{stats['mean']:.2f} ± {half:.2f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from the existing reports")
    parser.add_argument("--readme", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not args.table_only:
        for seed in args.seeds:
            run_seed(seed)
    table = {"seeds": args.seeds, "machine": machine(), "threads": os.environ.get("OMP_NUM_THREADS", "all"),
             "rows": [row for seed in args.seeds for row in rows_of(seed)]}
    (HERE / "results" / "estimators.json").write_text(json.dumps(table, indent=2) + "\n")
    (HERE / "results" / "estimators.md").write_text(markdown(table))
    if args.readme:
        write_between_markers(Path(args.readme), MARKERS, markdown(table))
    print(markdown(table))
    return table


if __name__ == "__main__":
    main()
