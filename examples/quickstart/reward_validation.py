"""Choose the quickstart's reward-model training on a validation split, never on its held-out pairs.

    python examples/quickstart/reward_validation.py runs/seed_sweep/seed0_threads2 runs/seed_sweep/seed1_threads2 \
        --variants "" "train.epochs=2" "train.learning_rate=2e-5"

For each pipeline folder (its preferences stage done), the reward stage's own training pairs (the pipeline's
hold-out already removed) are split again by prompt, as that stage splits its data (the quickstart: a quarter
of the prompts, with all their pairs): the validation set. Each variant (overrides of the reward config that
pipeline saved; "" is that config as it is) trains `rlft reward` on the rest and reports validation accuracy.
A variant may also hold `min_gap=G`: the same split, with only the pairs the judge separates by at least G on
both sides, which is exactly what `preferences.min_gap=G` would have paired (with `pairs: all`, from the same
samples); its validation accuracy is then on those pairs, as the reward stage would measure it, and beside it
on every validation pair of the split, so a variant cannot look better only because its test is easier. The
table (mean and spread over folders) goes to examples/quickstart/results/reward_validation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from reward_models import train as reward
from rlft.config import load_config
from rlft.data import load_splits
from rlft.pipeline import PipelineConfig, wire
from rlft.runs import CONFIG, METRICS, is_complete, read_json, save_config, saved_config_changes

ROOT = Path(__file__).resolve().parents[2]


def validation_pairs(folder: Path) -> tuple[Path, int]:
    """The reward stage's training pairs of a pipeline folder (from the config that pipeline saved), written
    out with that stage's config pointed at them: (config file, pair count)."""
    stage = wire(load_config(PipelineConfig, folder / CONFIG))["reward"]
    train, _, _ = load_splits(stage.data, ("preference",), stage.seed, "reward data")
    out = folder / "reward_validation"
    out.mkdir(exist_ok=True)
    train.to_json(out / "pairs.jsonl", lines=True)
    save_config(replace(stage, data=replace(stage.data, path=str(out / "pairs.jsonl"))), out / "reward.yaml")
    return out / "reward.yaml", len(train)


def pairs_with_gap(config_file: Path, gap: float) -> Path:
    """The split's training and validation pairs that the judge separates by at least `gap`, as a dataset folder
    (train.jsonl, test.jsonl: data.eval_split=test)."""
    config = load_config(reward.RewardConfig, config_file)
    train, validation, _ = load_splits(config.data, ("preference",), config.seed, "reward data")
    folder = Path(config.data.path).with_name(f"pairs_gap{gap:g}")
    folder.mkdir(exist_ok=True)
    for name, rows in (("train", train), ("test", validation)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows
                                                      if row["score_chosen"] - row["score_rejected"] >= gap))
    return folder


def every_validation_pair(config_file: Path) -> list[dict]:
    config = load_config(reward.RewardConfig, config_file)
    return list(load_splits(config.data, ("preference",), config.seed, "reward data")[1])


def accuracy_on(model_dir: Path, pairs: list[dict]) -> float:
    """Share of `pairs` whose chosen reply the reward model in `model_dir` scores above the rejected one."""
    from reward_models.scorers import ScorerConfig, build_scorer

    scorer = build_scorer([ScorerConfig(kind="model", path=str(model_dir))])
    reply = lambda side: side[-1]["content"] if isinstance(side, list) else side  # noqa: E731
    prompts = [row["prompt"] for row in pairs]
    chosen = scorer(prompts, [reply(row["chosen"]) for row in pairs])
    rejected = scorer(prompts, [reply(row["rejected"]) for row in pairs])
    return (chosen > rejected).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--variants", nargs="+", default=[""], help="space-free override lists, comma-joined")
    parser.add_argument("--table", default=str(ROOT / "examples" / "quickstart" / "results" / "reward_validation"))
    args = parser.parse_args(argv)
    results = {variant: [] for variant in args.variants}
    for folder in args.folders:
        base, train_pairs = validation_pairs(folder)
        every = every_validation_pair(base)
        for variant in args.variants:
            overrides = [o for o in variant.split(",") if o and not o.startswith("min_gap=")]
            gaps = [float(o.split("=", 1)[1]) for o in variant.split(",") if o.startswith("min_gap=")]
            if gaps:
                overrides += [f"data.path={pairs_with_gap(base, gaps[0])}", "data.eval_split=test"]
            out = base.parent / (variant.replace("=", "-").replace(",", "_") or "as_configured")
            config = load_config(reward.RewardConfig, base, [f"output_dir={out}", "resume=false", *overrides])
            finished = is_complete(out) and not saved_config_changes(out, config, ("resume",))  # read, not rerun
            metrics = read_json(out / METRICS) if finished else reward.run(config)
            results[variant].append({"folder": str(folder), "validation_accuracy": metrics["eval_accuracy_after"],
                                     "validation_pairs": metrics["eval_rows"], "train_pairs": metrics["train_rows"],
                                     "of_pairs": train_pairs, "wall_time_s": metrics["wall_time_s"],
                                     "every_pair_accuracy": accuracy_on(out, every), "every_pair_count": len(every)})
            print(variant or "(as configured)", folder, f"{metrics['eval_accuracy_after']:.3f}",
                  f"every pair {results[variant][-1]['every_pair_accuracy']:.3f}", flush=True)
    table = {"folders": [str(f) for f in args.folders], "variants": {
        variant: {"runs": rows, "mean": statistics.fmean(r["validation_accuracy"] for r in rows),
                  "std": statistics.stdev(r["validation_accuracy"] for r in rows) if len(rows) > 1 else 0.0}
        for variant, rows in results.items()}}
    Path(args.table).with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")
    train = load_config(reward.RewardConfig, base).train  # the last folder's; every folder runs one config
    lines = [f"Reward-model variants on validation pairs split from each run's reward training pairs "
             f"(folders: {', '.join(str(f) for f in args.folders)}). Each variant overrides the reward config "
             f"those pipelines ran (as configured: {train.epochs:g} epochs, learning rate {train.learning_rate:g}, "
             f"batch {train.batch_size}). Written by examples/quickstart/reward_validation.py.", "",
             "| variant | validation accuracy (mean ± std) | per run | validation pairs | on every validation pair "
             "(mean ± std) | per run | training pairs |", "|---|---|---|---|---|---|---|"]
    for variant, entry in table["variants"].items():
        every = [r["every_pair_accuracy"] for r in entry["runs"]]
        lines.append(f"| {variant or '(as configured)'} | {entry['mean']:.3f} ± {entry['std']:.3f} | "
                     f"{' / '.join(format(r['validation_accuracy'], '.3f') for r in entry['runs'])} | "
                     f"{' / '.join(str(r['validation_pairs']) for r in entry['runs'])} | "
                     f"{statistics.fmean(every):.3f} ± {statistics.stdev(every) if len(every) > 1 else 0.0:.3f} | "
                     f"{' / '.join(format(a, '.3f') for a in every)} | "
                     f"{' / '.join(str(r['train_pairs']) for r in entry['runs'])} |")
    Path(args.table).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    main()
