"""`rlft pipeline`: SFT -> preference pairs -> reward model -> PPO (or DPO on the pairs) -> report, wired together.

Each stage writes to `<output_dir>/<stage>` and is skipped when that folder already holds a finished
run (its metrics.json), so rerunning after an interruption continues instead of redoing. The pipeline
owns the wiring: every stage's output_dir, seed and the paths between stages are set here, whatever the
stage sections say; everything else in each section is that stage's own config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from reward_models import preferences
from reward_models import train as reward
from rlft import dpo, evaluate, runs, sft
from rlft.config import ModelConfig, option, require, require_seed, section
from rlft.dpo import DPOConfig
from rlft.errors import RlftError
from rlft.evaluate import EvalConfig
from rlft.ppo import train as ppo
from rlft.ppo.config import PPOConfig
from rlft.sft import SFTConfig
from reward_models.preferences import PAIRS, PreferenceConfig
from reward_models.scorers import ScorerConfig
from reward_models.train import RewardConfig

log = logging.getLogger(__name__)
STAGES = ("sft", "preferences", "reward", "ppo", "dpo", "eval")
DEFAULT_STAGES = ["sft", "preferences", "reward", "ppo", "eval"]  # dpo: configs/quickstart_dpo.yaml


@dataclass
class PipelineConfig:
    output_dir: str = option("runs/quickstart", "Root folder; each stage writes to <output_dir>/<stage>.")
    seed: int = option(0, "Every stage's seed (set here, not in the stage sections): one seed also keeps one "
                       "hold-out split, so PPO and the report never see SFT's held-out prompts in training.")
    stages: list[str] = option(DEFAULT_STAGES, f"Stages to run, in order, from {list(STAGES)}.")
    reuse_from: str = option(
        "", "Another pipeline's folder whose first stages (reuse_stages) this one uses, run there if not yet "
        "complete, so variants of a later stage share one SFT model (and pairs, and reward model); empty: its own.")
    reuse_stages: list[str] = option(
        list(STAGES[:3]), "The stages taken from reuse_from: sft, then optionally preferences, then reward (each is "
        "trained on the ones before). Where that pipeline reused a stage itself, it comes from where it did.")
    report_sft: bool = option(True, "The report also sets the SFT model against the base it started from (two more "
                              "sampling passes over the held-out prompts); PPO against SFT is reported either way.")
    sft: SFTConfig = section(SFTConfig, "Stage 1 (rlft sft).")
    preferences: PreferenceConfig = section(PreferenceConfig, "Pairs sampled from the SFT policy, ranked by a judge.")
    reward: RewardConfig = section(RewardConfig, "Stage 2 (rlft reward) on those pairs.")
    dpo: DPOConfig = section(DPOConfig, "DPO from the SFT adapter on the preference pairs (when stages name it).")
    ppo: PPOConfig = section(PPOConfig, "Stage 3 (rlft ppo): from the SFT adapter against the reward model, where the "
                             "pipeline has them (else ppo.model, ppo.sft_adapter and ppo.reward as set).")
    eval: EvalConfig = section(EvalConfig, "The report: SFT and PPO policies, the reward model as proxy, the judge as gold.")

    def __post_init__(self):
        require_seed(self.seed)
        unknown = [stage for stage in self.stages if stage not in STAGES]
        require(not unknown, "stages", f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        require(self.reuse_stages in [list(STAGES[:n]) for n in range(4)], "reuse_stages",
                f"must be one of [sft], [sft, preferences], [sft, preferences, reward] (got {self.reuse_stages})")


def stage_dir(root: Path, reuse_from: str, reuse_stages: list[str], stage: str) -> Path:
    """Where `stage`'s output lives: this pipeline's folder, or the one it reuses the stage from, followed
    through that pipeline's own reuse."""
    folder, seen = root, set()
    while reuse_from and stage in reuse_stages and Path(reuse_from).resolve() not in seen:
        folder = Path(reuse_from)
        seen.add(folder.resolve())
        saved = runs.read_config(folder / runs.CONFIG)
        reuse_from, reuse_stages = saved.get("reuse_from", ""), saved.get("reuse_stages", list(STAGES[:3]))
    return folder / stage


def same_weights(a: ModelConfig, b: ModelConfig) -> bool:
    return (a.name_or_path, a.revision, a.quantization) == (b.name_or_path, b.revision, b.quantization)


def used_stages(config: PipelineConfig) -> set[str]:
    """The stages whose output this pipeline uses: those it runs and those it reuses from reuse_from."""
    return set(config.stages) | (set(config.reuse_stages) if config.reuse_from else set())


def wire(config: PipelineConfig) -> dict:
    """Each stage's config with the pipeline's paths filled in: {stage name: config}.

    Without an SFT stage (run here or reused) PPO starts from ppo.model and ppo.sft_adapter as configured; without
    a reward model PPO optimises ppo.reward (reward functions: configs/quickstart_verifiable.yaml) and the report
    scores with eval.scorers."""
    root = Path(config.output_dir)
    sft_dir, pairs_dir, reward_dir = (str(stage_dir(root, config.reuse_from, config.reuse_stages, name))
                                      for name in STAGES[:3])
    ppo_dir = str(root / "ppo")

    used = used_stages(config)

    # A LoRA reward model on the SFT model's base starts from the SFT model (InstructGPT), and PPO then
    # scores with it on its own weights: one copy of the base for all four roles.
    one_base = config.reward.lora_enabled and same_weights(config.reward.model, config.sft.model)
    proxy = ScorerConfig(name="proxy", kind="adapter" if one_base else "model", path=reward_dir, normalize=True,
                         max_length=config.reward.train.max_length, dtype=config.reward.model.dtype)
    # The judge that ranked the preference pairs is the report's independent "gold" scorer.
    gold = replace(config.preferences.judge[0], name="gold")
    seed = config.seed
    check_one_hold_out(config)
    check_same_sampling(config)
    # PPO optimises the reward model this pipeline trains, from this pipeline's SFT model.
    ppo_config = replace(config.ppo, output_dir=ppo_dir, seed=seed)
    if "sft" in used:
        ppo_config = replace(ppo_config, sft_adapter=sft_dir, model=config.sft.model)
    dpo_dir = str(root / "dpo")
    # the report: SFT (if asked) and each preference-tuned policy this pipeline trains, PPO's checkpoints too
    tuned = [folder for stage, folder in (("ppo", ppo_dir), ("dpo", dpo_dir)) if stage in config.stages]
    eval_config = replace(config.eval, output_dir=str(root / "eval"), seed=seed,
                          checkpoints_of=ppo_dir if "ppo" in config.stages else "",
                          training_run=ppo_dir if "ppo" in config.stages else "",
                          # a pipeline that trains no policy (stages without ppo or dpo) keeps eval's own
                          policies=([sft_dir] if config.report_sft and "sft" in used else []) + tuned
                          or config.eval.policies)
    if "reward" in used:
        ppo_config = replace(ppo_config, reward=[proxy])
        eval_config = replace(eval_config, scorers=[proxy, gold], gold=gold.name)
    return {
        "sft": replace(config.sft, output_dir=sft_dir, seed=seed),
        # One seed, one hold-out split: preference and PPO prompts stay inside SFT's training split, so the
        # report's held-out prompts stay unseen.
        "preferences": replace(config.preferences, output_dir=pairs_dir, policy=sft_dir, seed=seed),
        "reward": replace(config.reward, output_dir=reward_dir, seed=seed,
                          sft_adapter=sft_dir if one_base else config.reward.sft_adapter,
                          data=replace(config.reward.data, path=str(Path(pairs_dir) / PAIRS))),
        "ppo": ppo_config,
        # DPO on the same pairs the reward model learns from, from the same SFT model (also its reference)
        "dpo": replace(config.dpo, output_dir=dpo_dir, seed=seed, data=replace(config.dpo.data, path=str(
            Path(pairs_dir) / PAIRS)), **({"sft_adapter": sft_dir, "model": config.sft.model} if "sft" in used else {})),
        "eval": eval_config,
    }


def check_one_hold_out(config: PipelineConfig) -> None:
    """Stages that read the same dataset (those run here or reused) must hold out the same prompts: with another
    fraction or split, some of the report's "held-out" prompts would be ones an earlier stage trained on."""
    held_out = ("eval_split", "eval_fraction")
    used = used_stages(config)
    earlier = []
    for stage, data in (("sft", config.sft.data), ("preferences", config.preferences.data), ("ppo", config.ppo.data),
                        ("eval", config.eval.data)):
        if stage not in used:
            continue
        for first, first_data in earlier:
            if (data.path, data.subset, data.split) != (first_data.path, first_data.subset, first_data.split):
                continue
            for key in held_out:
                if getattr(data, key) != getattr(first_data, key):
                    raise RlftError(f"{stage}.data.{key}={getattr(data, key)!r} but {first}.data.{key}="
                                    f"{getattr(first_data, key)!r} on the same dataset: set one hold-out for every "
                                    "stage, or the report's held-out prompts include trained ones")
            break
        earlier.append((stage, data))


def check_same_sampling(config: PipelineConfig) -> None:
    """The report measures the policy PPO trained as PPO sampled it: another temperature or length floor in eval
    would report the KL and the replies of another distribution than the one PPO's penalty held."""
    if not {"ppo", "eval"} <= set(config.stages):
        return
    for key in ("temperature", "min_new_tokens"):
        ppo_value, eval_value = getattr(config.ppo.sampling, key), getattr(config.eval.sampling, key)
        if ppo_value != eval_value:
            raise RlftError(f"eval.sampling.{key}={eval_value!r} but ppo.sampling.{key}={ppo_value!r}: set both to "
                            "one value, or the report measures another distribution than the one PPO trained")


# Keys a finished stage may differ in and still be reused: they change nothing it computed.
# a scorer's timeout only ends a hang: a finished stage ran whole under any
REUSABLE_CHANGES = ("output_dir", "resume", "push_to_hub", "hub_model_id", "hub_private", "reward.*.timeout",
                    "judge.*.timeout")


def check_reusable(stage: str, stage_config) -> None:
    """A finished stage is reused only if it ran with this config: else a variant would silently report
    another experiment's model."""
    changed = runs.saved_config_changes(stage_config.output_dir, stage_config, REUSABLE_CHANGES, moved=True)
    if changed:
        raise RlftError(
            f"[{stage}] '{stage_config.output_dir}' holds a finished run of another config "
            f"({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}): delete that folder to redo the "
            "stage, or pick another output_dir"
        )


def run(config: PipelineConfig) -> dict:
    stage_runners = {"sft": sft.run, "preferences": preferences.run, "reward": reward.run, "ppo": ppo.run,
                     "dpo": dpo.run, "eval": evaluate.run}
    stage_configs = wire(config)
    runs.prepare(config.output_dir, config, "pipeline")  # one pipeline per folder; each stage checks its resume
    runs.begin(config.output_dir, config)
    record = Path(config.output_dir) / "pipeline.json"
    # each stage's time from the run that did it: a rerun that reuses a stage keeps its figure
    timings = (runs.read_json(record, "delete it (it only records the stages' wall times)").get("stage_wall_time_s", {})
               if record.is_file() else {})
    for stage in config.stages:
        stage_config = stage_configs[stage]
        if runs.is_complete(stage_config.output_dir):
            check_reusable(stage, stage_config)
            log.info("[%s] already complete in %s: reusing it", stage, stage_config.output_dir)
            continue
        log.info("[%s] starting -> %s", stage, stage_config.output_dir)
        started = time.time()
        stage_runners[stage](stage_config)
        timings[stage] = time.time() - started
        log.info("[%s] done in %.0f s", stage, timings[stage])
        save_record(record, timings)  # after every stage: a pipeline stopped later keeps the times it earned
    return save_record(record, timings)


def save_record(record: Path, timings: dict[str, float]) -> dict:
    summary = {"stage_wall_time_s": timings, "peak_rss_mb": runs.peak_rss_mb()}
    runs.write_json(record, summary)
    return summary
