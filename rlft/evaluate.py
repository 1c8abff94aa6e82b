"""Stage `rlft eval`: how far each policy moved from its reference, and what the reward models think of it.

For every policy (and, with `checkpoints_of`, every checkpoint of a PPO run), on the same held-out prompts:
1. sample from the policy and from its reference (the same weights with the adapter disabled), same seed;
2. score both with every scorer: mean, std, 95% CI, and the policy's win rate over the reference;
3. measure KL drift on the policy's own samples: the sampled k1 estimate and the exact full-vocabulary
   KL(pi || pi_ref), both summed over the response; per-token KL, response length, EOS rate; and the
   sampler's own log-probs against the recomputed ones (a model that decodes wrongly stops the run).
Then report.json (every number), and report.md / report.html with plots (rendering lives in rlft.report).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from reward_models.scorers import ScorerConfig, build_scorer, require_columns
from rlft import hacking, runs
from rlft.config import DataConfig, ModelConfig, option, require, require_seed, section
from rlft.data import columns_of, load_splits, prompt_key, prompts_of, render_prompts, rows_of
from rlft.errors import RlftError
from rlft.generation import (
    Responses,
    SamplingConfig,
    ban_early_eos,
    check_prompt_lengths,
    completion_ids,
    off_policy,
    sample,
)
from rlft.metrics import METRICS_JSONL, read_metrics, timed
from rlft.models import default_device, half_compute, load_tokenizer
from rlft.policy import ADAPTER_INFO, adapter_info, load_policy
from rlft.ppo import checkpoint
from rlft.report import write_report
from rlft.ppo.core import (
    exact_kl_from_logits,
    kl_penalty,
    logprob_gap,
    logprobs_from_logits,
)

log = logging.getLogger(__name__)

DEFAULT_SCORERS = [
    ScorerConfig(name="proxy", kind="model", path="runs/reward", normalize=True),
    ScorerConfig(name="gold", kind="function", path="reward_models.judges:sentiment"),
]


@dataclass
class EvalConfig:
    policies: list[str] = option(
        ["runs/sft", "runs/ppo"],
        "Adapters to evaluate: an SFT output dir, a PPO run dir (its policy/ folder), or a checkpoint folder.",
    )
    checkpoints_of: str = option("", "A PPO run dir: also evaluate every checkpoint in it (over-optimisation plot).")
    training_run: str = option(
        "", "A PPO run dir whose metrics.jsonl gives the training curves; empty: the PPO run among `policies`."
    )
    num_prompts: int = option(64, "Evaluate on at most this many held-out prompts.")
    checkpoint_prompts: int = option(
        0, "Evaluate the checkpoints of `checkpoints_of` on the first this many of those prompts (0: all of them): "
        "the over-optimisation curve and the recommended checkpoint come from these; `policies` always get all.")
    num_samples_shown: int = option(8, "Sample completions per policy shown in the report.")
    seed: int = option(
        0, "Seed of every sampling pass (torch.manual_seed before each), and of the hold-out split: keep it "
        "equal to the SFT seed so the prompts stay unseen."
    )
    batch_size: int = option(
        32, "Prompts per generation batch and rows per KL forward pass (memory grows with it and the vocabulary)."
    )
    output_dir: str = option("runs/eval", "Where report.json, report.md, report.html and the plots go.")
    trust_remote_code: bool = option(
        False, "Let the policies' base model run its own code from the hub. Only this flag decides: the "
        "adapter folders' records never do, since a downloaded folder could ask for it.",
    )
    kl_budget: float = option(
        0.0, "Recommend the checkpoint with the best gold (else proxy) score whose exact KL is at most this and whose "
        "replies did not collapse (nats per response; 0: the ppo.kl_budget of the checkpoints' run, else none).")
    collapse_signals: list[str] = option(
        [], "Signals that count a policy's replies as collapsed (rlft.hacking.COLLAPSE_LIMITS); empty: the "
        "ppo.collapse_signals of the checkpoints' run, else all.")
    gold: str = option("", "Name of the gold scorer (reported apart from the proxy); empty: one named 'gold', if any.")
    scorers: list[ScorerConfig] = option(
        DEFAULT_SCORERS, "Reward models / functions, each reported separately; the first is the proxy (PPO's reward)."
    )
    data: DataConfig = section(
        DataConfig, "Prompts: the eval split (or held-out share) of a dataset. data.eval_split=train uses every row."
    )
    sampling: SamplingConfig = section(
        SamplingConfig, "How policy and reference sample (as PPO sampled: its temperature and min_new_tokens; the "
        "pipeline checks).")
    max_sampler_gap: float = option(
        0.2, "Stop when the sampler's log-probs of its own tokens differ from the recomputed ones by more than this "
        "(mean |difference| per token, nats; as ppo.max_sampler_gap): the samples do not come from the policy "
        "measured. Checked where sampling.top_p=1 and top_k=0 (else the sampler's distribution is truncated).")

    def __post_init__(self):
        require_seed(self.seed)
        require(bool(self.policies) or bool(self.checkpoints_of), "policies", "name at least one adapter folder")
        require(self.num_prompts > 0, "num_prompts", "must be >= 1")
        require(self.checkpoint_prompts >= 0, "checkpoint_prompts", "must be >= 0 (0: all num_prompts)")
        require(self.num_samples_shown >= 0, "num_samples_shown", "must be >= 0")
        require(self.batch_size > 0, "batch_size", "must be >= 1")
        require(self.kl_budget >= 0, "kl_budget", "must be >= 0 (0: no budget)")
        unknown = [signal for signal in self.collapse_signals if signal not in hacking.COLLAPSE_LIMITS]
        require(not unknown, "collapse_signals", f"unknown signal(s) {unknown}; choose from "
                f"{list(hacking.COLLAPSE_LIMITS)}")
        require(self.max_sampler_gap > 0, "max_sampler_gap", "must be > 0")
        require(len(self.scorers) > 0, "scorers", "name at least one scorer (the first is the proxy reward)")
        names = [s.name for s in self.scorers]  # ScorerConfig derives a missing name from its path
        require(len(names) == len(set(names)), "scorers", f"names must differ, got {names}: give each a `name`")
        require(not self.gold or self.gold in names[1:], "gold",
                f"'{self.gold}' is not one of the scorers after the proxy ({', '.join(names[1:]) or 'none'})")

    @property
    def gold_scorer(self) -> str | None:
        """The scorer reported as ground truth: `gold`, else one named 'gold' (never the proxy)."""
        names = [s.name for s in self.scorers]
        return self.gold or ("gold" if "gold" in names[1:] else None)


# ---------------------------------------------------------------------------------------------------
# Inputs


class Adapter(NamedTuple):
    label: str  # as the report names it
    folder: Path  # holds adapter_config.json and rlft_adapter.json
    step: int | None  # PPO step of a checkpoint, else None
    model_config: ModelConfig
    reference_adapter: str | None


def find_adapter(path: str, label: str | None = None) -> Adapter:
    """An adapter folder itself, or a PPO run dir / checkpoint folder holding one in policy/."""
    folder = Path(path)
    if not folder.is_dir():
        raise RlftError(f"policy '{path}' not found: pass an SFT output dir, a PPO run dir or a checkpoint folder")
    if not (folder / ADAPTER_INFO).is_file() and (folder / "policy" / ADAPTER_INFO).is_file():
        folder = folder / "policy"
    model_config, reference_adapter = adapter_info(folder)  # one clear line if it is no rlft adapter
    step = checkpoint.step_of(folder.parent)
    if step is not None and not label:  # <run>/checkpoints/step-N/policy
        label = f"{folder.parents[2].name} step {step}"
    return Adapter(label or Path(path).name, folder, step, model_config, reference_adapter)


def find_checkpoints(run_dir: str) -> list[Adapter]:
    """Every `checkpoints/step-N/policy` of a PPO run, in step order."""
    if not Path(run_dir).is_dir():
        raise RlftError(f"checkpoints_of: PPO run dir '{run_dir}' not found")
    found = [(step, p) for p in (Path(run_dir) / "checkpoints").glob("step-*/policy")
             if (step := checkpoint.step_of(p.parent)) is not None]
    if not found:
        raise RlftError(f"checkpoints_of: '{run_dir}' has no checkpoints/step-N/policy folders: is it a PPO run dir?")
    return [find_adapter(str(path), f"step {step}") for step, path in sorted(found)]


def check_same_base(adapters: list[Adapter]) -> None:
    """All policies must share a base model, or their rewards and KLs are not comparable (nor loadable as one)."""
    first = adapters[0]
    for adapter in adapters[1:]:
        if adapter.model_config.name_or_path != first.model_config.name_or_path:
            raise RlftError(
                f"'{adapter.folder}' was trained on base model '{adapter.model_config.name_or_path}' but "
                f"'{first.folder}' on '{first.model_config.name_or_path}': evaluate one base model's policies at a time"
            )


def load_prompts(config: EvalConfig) -> tuple[list, dict[str, list]]:
    """(the held-out prompts, the data's other columns of each: rlft.data.columns_of)."""
    _, evaluation, _ = load_splits(
        config.data, ("prompt_only", "conversational", "prompt_completion"), config.seed, "eval prompts"
    )
    # One prompt once: a held-out prompt with several replies would count its win several times.
    prompts = prompts_of(evaluation)  # refuses none
    first = {}
    for row, prompt in enumerate(prompts):
        first.setdefault(prompt_key(prompt), row)
    rows = list(first.values())[: config.num_prompts]
    return [prompts[row] for row in rows], rows_of(columns_of(evaluation), rows)


def fingerprint(adapter: Adapter) -> str:
    """Same weights on the same reference give the same numbers: hash the weights and the lineage."""
    digest = hashlib.sha256(json.dumps([asdict(adapter.model_config), adapter.reference_adapter]).encode())
    for weights in sorted(adapter.folder.glob("adapter_model.*")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()


def training_result(run_dir: str) -> dict | None:
    """Which checkpoint a PPO run kept as its result, at what KL by its own measurement, under what budget."""
    metrics = Path(run_dir) / runs.METRICS if run_dir else None
    if metrics is None or not metrics.is_file():
        return None
    summary = runs.read_json(metrics)
    if "result_step" not in summary:
        return None
    return {**{key: summary[key] for key in ("result_step", "result_kl", "kl_budget")},
            "result_scale": summary.get("result_scale", 1.0),
            "collapse_signals": summary.get("collapse_signals", list(hacking.COLLAPSE_LIMITS))}


def default_training_run(config: EvalConfig) -> str:
    for path in [*config.policies, config.checkpoints_of]:
        if path and (Path(path) / METRICS_JSONL).is_file():
            return path
    return ""


# ---------------------------------------------------------------------------------------------------
# Sampling and KL


@dataclass
class SamplePass:
    """One seeded sampling pass over the prompts, kept in generation batches (their prompt widths differ)."""

    batches: list[Responses]

    @property
    def completions(self) -> list[str]:
        return [text for batch in self.batches for text in batch.texts]

    @property
    def completion_ids(self) -> list[list[int]]:
        return [ids for batch in self.batches for ids in completion_ids(batch.ids, batch.mask)]

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) response tokens, counting the EOS."""
        return torch.cat([batch.mask.sum(-1).cpu() for batch in self.batches])

    @property
    def ended_with_eos(self) -> torch.Tensor:
        """(N,) bool."""
        return torch.cat([batch.ended_with_eos.cpu() for batch in self.batches])


def sequence_kl(logits, ref_logits, tokens, lengths: list[int], temperature: float = 1.0):
    """KL(pi || pi_ref) of each response, two ways, from policy and reference logits on the policy's samples.

    logits, ref_logits: (N, V) at the N response tokens of B responses laid end to end; tokens: (N,) the
    sampled tokens; lengths: B response lengths summing to N -> (sampled (B,), exact (B,), token_exact (N,),
    logprobs (N,): the policy's log-prob of each token).
    sampled = sum_t log pi(y_t) - log pi_ref(y_t) (k1: unbiased, noisy, can be negative); exact =
    sum_t KL(pi(.|y_<t) || pi_ref(.|y_<t)) over the full vocabulary. By the chain rule both have expectation
    KL(pi || pi_ref) of whole responses under y ~ pi (Schulman 2020, "Approximating KL divergence").
    """
    logprobs = logprobs_from_logits(logits, tokens, temperature)
    log_ratio = kl_penalty(logprobs, logprobs_from_logits(ref_logits, tokens, temperature), "k1")
    token_exact = exact_kl_from_logits(logits, ref_logits, temperature)
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(tokens.device)
    per_response = torch.zeros(len(lengths), dtype=torch.float32, device=tokens.device)
    return (per_response.index_add(0, row, log_ratio), per_response.index_add(0, row, token_exact), token_exact,
            logprobs)


class Packed(NamedTuple):
    """Rows of (prompt, response) without padding, right-padded into one teacher-forcing batch."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    keep: int  # logits are computed for the last `keep` positions only
    row: torch.Tensor  # (N,) row of each response token
    position: torch.Tensor  # (N,) index, among the kept positions, of the logits that predict it
    tokens: torch.Tensor  # (N,) the response tokens
    lengths: list[int]  # B response lengths summing to N


def pack(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> Packed:
    sequences = [torch.cat(row) for row in rows]
    input_ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
    # the logits at position p predict token p + 1, so response token t of a row with a P-token prompt
    # is predicted at P - 1 + t; no logits are needed before the shortest prompt ends
    first = min(len(prompt) for prompt, _ in rows) - 1
    lengths = [len(response) for _, response in rows]
    position = torch.cat([torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response)) for prompt, response in rows])
    row = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths))
    device = input_ids.device
    return Packed(input_ids, attention_mask, input_ids.shape[1] - first, row.to(device), (position - first).to(device),
                  torch.cat([response for _, response in rows]), lengths)


def response_logits(model, packed: Packed) -> torch.Tensor:
    """(N, V) logits predicting each response token of a packed batch."""
    output = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, logits_to_keep=packed.keep)
    return output.logits[packed.row, packed.position]


@torch.no_grad()
def kl_drift(model, rollout: SamplePass, sampling: SamplingConfig, eos_token_id: int, batch_size: int) -> dict:
    """Sampled and exact KL of each of the policy's responses; the reference is `model.disable_adapter()`. And
    the gap between the sampler's own log-probs and the ones recomputed here (rlft.ppo.core.logprob_gap).
    Both distributions are the ones sampled from: at `sampling.temperature`, EOS banned before
    `sampling.min_new_tokens` (as PPO's log-probs and KL penalty are).

    Teacher-forced on each row's real tokens only (prompt without its left padding, response through its
    EOS), right-padded in batches of similar length, so rows that stopped early cost no padding.
    """
    rows = [  # (prompt ids, response ids) without padding
        (prompt[attention.bool()], response[mask])
        for batch in rollout.batches
        for prompt, attention, response, mask in zip(
            batch.query["input_ids"], batch.query["attention_mask"], batch.ids, batch.mask
        )
    ]
    sampler_logprobs = [row[mask] for batch in rollout.batches for row, mask in zip(batch.logprobs, batch.mask)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    sampled, exact, per_token = torch.zeros(len(rows)), torch.zeros(len(rows)), [[] for _ in rows]
    drawn, recomputed = [], []  # the sampler's and kl_drift's log-probs of the same tokens
    for start in range(0, len(rows), batch_size):
        chunk = order[start : start + batch_size]
        packed = pack([rows[i] for i in chunk])
        positions = torch.cat([torch.arange(length) for length in packed.lengths])  # each token's index in its reply
        with half_compute(model):
            logits = response_logits(model, packed)
            with model.disable_adapter():
                ref_logits = response_logits(model, packed)
        logits, ref_logits = (ban_early_eos(x, positions, eos_token_id, sampling.min_new_tokens)
                              for x in (logits, ref_logits))
        chunk_sampled, chunk_exact, token_exact, logprobs = sequence_kl(
            logits, ref_logits, packed.tokens, packed.lengths, sampling.temperature
        )
        sampled[chunk], exact[chunk] = chunk_sampled.cpu(), chunk_exact.cpu()
        for i, values in zip(chunk, token_exact.cpu().split(packed.lengths)):
            per_token[i] = values.tolist()
        drawn += [sampler_logprobs[i] for i in chunk]
        recomputed.append(logprobs)
    drawn, recomputed = torch.cat(drawn), torch.cat(recomputed)
    gap = logprob_gap(drawn, recomputed, torch.ones_like(drawn, dtype=torch.bool))
    return {"sampled": sampled, "exact": exact, "per_token": per_token,
            "sampler_gap": {key: value.item() for key, value in gap.items()}}


# ---------------------------------------------------------------------------------------------------
# Statistics


def summary(values: torch.Tensor) -> dict:
    """Mean, sample std and a normal-approximation 95% confidence interval of the mean."""
    x = values.double()
    n = x.numel()
    mean = x.mean().item()
    std = x.std().item() if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def win_rate(policy: torch.Tensor, reference: torch.Tensor) -> dict:
    """Share of prompts where the policy's response outscores the reference's (ties count half), with a CI."""
    wins = (policy > reference).double() + 0.5 * (policy == reference).double()
    return summary(wins)


def token_kl_quantiles(per_token: list[list[float]]) -> dict:
    """How the exact KL spreads over response tokens (a few tokens often carry most of it)."""
    values = np.array([v for row in per_token for v in row] or [0.0])
    p50, p90, p99 = np.quantile(values, [0.5, 0.9, 0.99])
    return {"tokens": sum(map(len, per_token)), "mean": float(values.mean()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(values.max())}


def response_stats(rollout: SamplePass) -> dict:
    return {"length": summary(rollout.lengths), "eos_rate": rollout.ended_with_eos.double().mean().item()}


def show_prompt(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ---------------------------------------------------------------------------------------------------
# The stage


def evaluate_adapter(adapter: Adapter, prompts: list, columns: dict[str, list], scorers: dict, config: EvalConfig,
                     reference_cache: dict) -> dict:
    """Every number the report shows for one policy. References shared by several policies are sampled once."""
    times: dict[str, float] = {}
    with timed(times, "load"):
        model, tokenizer, _ = load_policy(adapter.folder, default_device(), trust_remote_code=config.trust_remote_code)
        model.eval()
        prompt_texts = render_prompts(tokenizer, prompts)
    with timed(times, "generate"):
        torch.manual_seed(config.seed)  # the same draws for every policy and its reference
        policy = SamplePass(sample(model, tokenizer, prompt_texts, config.sampling, config.batch_size))
    with timed(times, "kl"):
        kl = kl_drift(model, policy, config.sampling, tokenizer.eos_token_id, config.batch_size)
    sampler = check_sampler(kl["sampler_gap"], config, adapter)
    lineage = (json.dumps(asdict(adapter.model_config), sort_keys=True), adapter.reference_adapter, len(prompts))
    if lineage not in reference_cache:
        with timed(times, "reference"), model.disable_adapter():
            torch.manual_seed(config.seed)
            reference = SamplePass(sample(model, tokenizer, prompt_texts, config.sampling, config.batch_size))
        with timed(times, "score"):
            reference_cache[lineage] = (reference, {n: s(prompts, reference.completions, **columns,
                                                      completion_ids=reference.completion_ids)
                                                    for n, s in scorers.items()})
    reference, reference_scores = reference_cache[lineage]
    with timed(times, "score"):
        policy_scores = {name: scorer(prompts, policy.completions, **columns, completion_ids=policy.completion_ids)
                         for name, scorer in scorers.items()}

    shown = range(min(config.num_samples_shown, len(prompts)))
    result = {
        "label": adapter.label,
        "path": str(adapter.folder),
        "step": adapter.step,
        "prompts": len(prompts),
        "base_model": adapter.model_config.name_or_path,
        "reference_adapter": adapter.reference_adapter,
        "rewards": {
            name: {
                "policy": summary(policy_scores[name]),
                "reference": summary(reference_scores[name]),
                "win_rate": win_rate(policy_scores[name], reference_scores[name]),
            }
            for name in policy_scores
        },
        "kl": {"sampled": summary(kl["sampled"]), "exact": summary(kl["exact"]),
               "per_token_exact": token_kl_quantiles(kl["per_token"])},
        "response": {"policy": response_stats(policy), "reference": response_stats(reference)},
        "sampler": sampler,
        "samples": [
            {
                "prompt": show_prompt(prompts[i]),
                "reference": reference.completions[i],
                "policy": policy.completions[i],
                "scores": {n: {"reference": reference_scores[n][i].item(), "policy": policy_scores[n][i].item()}
                           for n in policy_scores},
            }
            for i in shown
        ],
        "per_prompt": {
            "kl_sampled": kl["sampled"].tolist(),
            "kl_exact": kl["exact"].tolist(),
            "kl_exact_per_token": kl["per_token"],
            "scores": {n: {"policy": policy_scores[n].tolist(), "reference": reference_scores[n].tolist()}
                       for n in policy_scores},
        },
        "time": times,
    }
    result["hacking"] = hacking.detectors(
        result["per_prompt"]["scores"], {"policy": policy.lengths.tolist(), "reference": reference.lengths.tolist()},
        {"policy": policy.completions, "reference": reference.completions}, config.scorers[0].name, config.gold_scorer,
        config.collapse_signals)
    if warnings := result["hacking"]["collapse"]["warnings"]:
        log.warning("%s: the replies collapsed against the reference's: %s", adapter.label, "; ".join(warnings))
    proxy = result["rewards"][config.scorers[0].name]
    log.info(
        "%s: proxy %.3f (reference %.3f), KL exact %.3f / sampled %.3f; %s", adapter.label, proxy["policy"]["mean"],
        proxy["reference"]["mean"], result["kl"]["exact"]["mean"], result["kl"]["sampled"]["mean"],
        ", ".join(f"{name} {seconds:.0f}s" for name, seconds in times.items()),
    )
    return result


def check_sampler(gap: dict[str, float], config: EvalConfig, adapter: Adapter) -> dict[str, float] | None:
    """The sampler/trainer log-prob gap as the report keeps it (PPO's metric names, under "sampler"); stops the
    run past `max_sampler_gap`. None under top_p < 1 or top_k > 0: the sampler drew from a truncated
    distribution, kl_drift recomputes the whole one, so the two differ by design."""
    if config.sampling.top_p < 1 or config.sampling.top_k:
        return None
    if not gap["mean"] <= config.max_sampler_gap:
        raise off_policy(f"{adapter.label}:", gap["mean"], "max_sampler_gap", config.max_sampler_gap,
                         adapter.model_config.name_or_path)
    return {f"logprob_gap_{key}": value for key, value in gap.items()}


def run(config: EvalConfig) -> dict:
    started = time.time()
    # 1. check every input before loading a model: adapters, one base model, prompts, training metrics
    policies = [find_adapter(path) for path in config.policies]
    if len({p.label for p in policies}) < len(policies):  # two folders of one name: tell them apart by path
        policies = [p._replace(label=path) for p, path in zip(policies, config.policies)]
    checkpoints = find_checkpoints(config.checkpoints_of) if config.checkpoints_of else []
    check_same_base(policies + checkpoints)
    prompts, columns = load_prompts(config)
    bases = {json.dumps(asdict(a.model_config), sort_keys=True): a.model_config for a in policies + checkpoints}
    for model_config in bases.values():  # each base's tokenizer and config file: no weights yet
        model_config = replace(model_config, trust_remote_code=config.trust_remote_code)
        tokenizer = load_tokenizer(model_config)
        check_prompt_lengths(tokenizer, render_prompts(tokenizer, prompts), config.sampling, model_config)
    training_run = config.training_run or default_training_run(config)
    if training_run and not (Path(training_run) / METRICS_JSONL).is_file():
        raise RlftError(f"training_run: '{Path(training_run) / METRICS_JSONL}' not found: point it at a PPO run dir")
    training = read_metrics(training_run) if training_run else []
    # no budget of its own: the one PPO kept its result within, so both choose under one limit
    trained = training_result(config.checkpoints_of) or {}
    kl_budget = config.kl_budget or trained.get("kl_budget", 0.0)
    out = runs.prepare(config.output_dir, config, "eval")
    # the signals PPO judged collapse by, unless set here: one verdict in the run and its report
    config = replace(config, collapse_signals=config.collapse_signals or trained.get(
        "collapse_signals", list(hacking.COLLAPSE_LIMITS)))

    # 2. scorers, loaded once for all policies, each reported separately under its config name
    scorers = {scorer.name: build_scorer([scorer], default_device()) for scorer in config.scorers}
    for scorer in scorers.values():
        require_columns(scorer, columns, config.data.path)

    # 3. sample, score and measure every policy and checkpoint on the same prompts
    runs.seed_everything(config.seed)
    reference_cache: dict = {}
    done: dict = {}  # a PPO run's final policy is its last checkpoint: evaluate those weights once
    # the checkpoints only draw a curve and choose among themselves: fewer prompts do (the first ones, same
    # order), the same ones for all of them, so their scores compare
    few = min(config.checkpoint_prompts or len(prompts), len(prompts))
    checkpoint_prompts, checkpoint_columns = prompts[:few], rows_of(columns, range(few))

    def evaluate(adapter: Adapter, prompts: list, columns: dict[str, list]) -> dict:
        key = (fingerprint(adapter), len(prompts))
        if key not in done:
            done[key] = evaluate_adapter(adapter, prompts, columns, scorers, config, reference_cache)
        return {**done[key], "label": adapter.label, "path": str(adapter.folder), "step": adapter.step}

    report = {
        "prompts": {"source": config.data.path, "count": len(prompts), "checkpoints": few},
        "sampling": asdict(config.sampling),
        "seed": config.seed,
        "kl_budget": kl_budget,
        "proxy": config.scorers[0].name,
        "gold": config.gold_scorer,
        "scorers": [asdict(scorer) for scorer in config.scorers],
        "policies": [evaluate(adapter, prompts, columns) for adapter in policies],
        "checkpoints": [evaluate(adapter, checkpoint_prompts, checkpoint_columns) for adapter in checkpoints],
        "training": {"run": training_run, "rows": training} if training_run else None,
    }
    if checkpoints:  # the checkpoint to ship: the best judged one the KL budget allows
        report["recommended"] = hacking.recommend(hacking.overoptimization_points(report), kl_budget,
                                                  by="gold" if report["gold"] else "proxy")
        report["training_result"] = training_result(config.checkpoints_of)

    # 4. save: numbers first (minutes of sampling survive a plotting error), then plots and readable reports
    runs.begin(out, config)
    runs.write_json(out / "report.json", report)
    report["files"] = write_report(report, out)
    report = runs.stage_metrics(report, started)  # wall time and peak RSS, as every stage's metrics.json
    runs.write_json(out / "report.json", report)
    log.info("report in %s (%.0fs)", out / "report.html", report["wall_time_s"])
    return report
