"""`rlft preferences`: preference pairs without human labels, from a policy's own samples and a judge.

For each prompt: sample `num_samples` completions from the policy (an SFT adapter, or a plain base
model), score them with the judge (any scorer), and keep (prompt, chosen=best, rejected=worst) unless
the judge ties them or their gap is under `min_gap` (with `pairs: all`, every two samples it separates so).
Pairs go to output_dir/pairs.jsonl in TRL's conversational preference format, ready for
`rlft reward data.path=<output_dir>/pairs.jsonl`. Because both sides are SFT samples, the reward model's
normalization.json then centres the SFT policy at 0.

"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from reward_models.judges import every_pair, pick_pair
from reward_models.scorers import ScorerConfig, build_scorer, require_columns
from rlft import runs
from rlft.config import DataConfig, ModelConfig, option, require, require_seed, section
from rlft.data import columns_of, load_splits, prompt_key, prompts_of, render_prompts, rows_of
from rlft.errors import RlftError
from rlft.generation import SamplingConfig, check_prompt_lengths, completion_ids, sample
from rlft.models import load_model, load_tokenizer
from rlft.policy import adapter_info, load_policy

log = logging.getLogger(__name__)
PAIRS = "pairs.jsonl"


@dataclass
class PreferenceConfig:
    output_dir: str = option("runs/preferences", "Where pairs.jsonl, the resolved config and metrics go.")
    seed: int = option(0, "Seed for the prompt hold-out and sampling.")
    policy: str = option("", "SFT adapter folder (an rlft sft output) to sample from; empty: sample from `model`. "
                         "Its base loads with model.trust_remote_code, whatever the folder records.")
    model: ModelConfig = section(ModelConfig, "The model to sample from when `policy` is empty.")
    data: DataConfig = section(
        DataConfig, "Prompts (`prompt` or `messages` rows). Only the training split is used, so with the "
        "SFT run's seed and eval_fraction the held-out prompts stay unseen.",
    )
    num_samples: int = option(4, "Completions sampled per prompt (>= 2).")
    pairs: Literal["best_worst", "all"] = option(
        "best_worst", "Pairs per prompt: the judge's best and worst sample, or every two samples it separates by "
        "min_gap (up to num_samples*(num_samples-1)/2 pairs from the same samples; a reward stage holds out "
        "whole prompts, so its held-out pairs stay unseen).")
    batch_size: int = option(16, "Prompts per generation batch.")
    min_gap: float = option(0.0, "Keep a pair only if the judge's scores differ by at least this (ties never).")
    sampling: SamplingConfig = section(SamplingConfig, "How completions are sampled.")
    judge: list[ScorerConfig] = field(
        default_factory=lambda: [ScorerConfig(kind="function", path="reward_models.judges:sentiment")],
        metadata={"help": "Scorers (weighted sum) that rank the samples: rule functions or reward models."},
    )

    def __post_init__(self):
        require_seed(self.seed)
        require(self.num_samples >= 2, "num_samples", f"must be >= 2 to form a pair, got {self.num_samples}")
        require(self.batch_size > 0, "batch_size", "must be >= 1")
        require(self.min_gap >= 0, "min_gap", "must be >= 0")
        require(len(self.judge) > 0, "judge", "name at least one scorer, e.g. reward_models.judges:sentiment")


def run(config: PreferenceConfig) -> dict:
    started = time.time()
    runs.seed_everything(config.seed)
    out = runs.prepare(config.output_dir, config, "preferences")
    train_data, _, _ = load_splits(config.data, ("prompt_only", "conversational"), config.seed, "prompt data")
    prompts = prompts_of(train_data)
    judge = build_scorer(config.judge)  # before the policy: a judge that doesn't import fails in seconds
    columns = columns_of(train_data)
    require_columns(judge, columns, config.data.path)
    trust = config.model.trust_remote_code
    model_config = adapter_info(config.policy, trust)[0] if config.policy else config.model
    tokenizer = load_tokenizer(model_config)
    prompt_texts = render_prompts(tokenizer, prompts)
    check_prompt_lengths(tokenizer, prompt_texts, config.sampling, model_config)  # before the weights load
    model = load_policy(config.policy, trust_remote_code=trust)[0] if config.policy else load_model(config.model)

    k = config.num_samples
    # k passes over all prompts: sample i of every prompt, then sample i + 1
    passes = [[(text, ids) for batch in sample(model, tokenizer, prompt_texts, config.sampling, config.batch_size)
               for text, ids in zip(batch.texts, completion_ids(batch.ids, batch.mask))] for _ in range(k)]
    drawn = [list(replies) for replies in zip(*passes)]  # per prompt: its k (text, token ids)
    samples = [[text for text, _ in replies] for replies in drawn]
    each = [row for row in range(len(prompts)) for _ in range(k)]  # each prompt's row, once per sample
    scores = judge([prompts[row] for row in each], [c for row in samples for c in row], **rows_of(columns, each),
                   completion_ids=[ids for replies in drawn for _, ids in replies]).view(-1, k)
    pairing = every_pair if config.pairs == "all" else lambda *args: [row] if (row := pick_pair(*args)) else []
    rows = [row for p, s, sc in zip(prompts, samples, scores) for row in pairing(p, s, sc.tolist(), config.min_gap)]
    if not rows:
        raise RlftError(f"the judge '{judge.name}' tied every prompt's samples (or min_gap={config.min_gap} "
                        "was never reached): raise num_samples or sampling.temperature, or lower min_gap")
    runs.begin(out, config)
    runs.write_text(out / PAIRS, "".join(json.dumps(row) + "\n" for row in rows))  # whole, or the old file stays
    gaps = [row["score_chosen"] - row["score_rejected"] for row in rows]
    metrics = runs.stage_metrics({
        "pairs": len(rows),
        "prompts": len(prompts),
        "prompts_with_pairs": len({prompt_key(row["prompt"]) for row in rows}),
        "mean_gap": sum(gaps) / len(gaps),
        "judge/mean_score": scores.mean().item(),
        "judge": judge.name,
    }, started)
    log.info("%d pairs from %d prompts, mean judge gap %.3f", len(rows), len(prompts), metrics["mean_gap"])
    runs.write_json(out / runs.METRICS, metrics)
    return metrics
