"""Reward-hacking detectors for `rlft eval`: signs that a policy pleases its proxy reward, not the task.

Each is a small function of what the report already holds (per-prompt scores, lengths, completions):
- length: does the score follow response length (Singhal et al. 2023, "A Long Way to Go"), and did the
  policy's length shift from its reference's?
- disagreement: on how many prompts the proxy prefers the policy's reply while gold prefers the
  reference's (Gao et al. 2022: over-optimisation is proxy and gold parting ways);
- diversity: distinct-n and self-BLEU of the policy's samples against its reference's (mode collapse);
- a recommended checkpoint: the best gold (else proxy) score within a KL budget.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd  # ranks without scipy (pandas comes with datasets and evaluate)

DIVERSITY_MODULE = Path(__file__).parent / "measurements" / "diversity.py"


def spearman(x, y) -> float | None:
    """Spearman's rank correlation of two (n,) sequences (ties share their mean rank); None when either is
    constant, where it is undefined."""
    rho = pd.Series(x, dtype=float).rank().corr(pd.Series(y, dtype=float).rank())
    return None if math.isnan(rho) else float(rho)


def disagreement_rate(proxy_policy, proxy_reference, gold_policy, gold_reference) -> float:
    """Share of prompts where the proxy strictly prefers the policy's reply and gold strictly the reference's.

    All four: (n,) scores on the same prompts.
    """
    proxy_policy, proxy_reference, gold_policy, gold_reference = map(
        np.asarray, (proxy_policy, proxy_reference, gold_policy, gold_reference))
    return float(((proxy_policy > proxy_reference) & (gold_policy < gold_reference)).mean())


@lru_cache(maxsize=1)
def diversity_measurement():
    import evaluate

    return evaluate.load(str(DIVERSITY_MODULE))


@lru_cache(maxsize=64)  # a reference's samples recur for every policy and checkpoint that shares it
def diversity_of(completions: tuple[str, ...]) -> dict:
    return diversity_measurement().compute(data=list(completions))


def diversity(completions: list[str]) -> dict:
    """{distinct_1, distinct_2, self_bleu} of one policy's samples (see rlft/measurements/diversity.py)."""
    return dict(diversity_of(tuple(completions)))


def detectors(scores: dict, lengths: dict, completions: dict, proxy: str, gold: str | None) -> dict:
    """Every detector for one policy against its reference.

    scores: {scorer: {"policy": (n,), "reference": (n,)}}; lengths and completions: {"policy": ..., "reference": ...}.
    """
    sides = ("policy", "reference")
    result = {
        "length_correlation": {name: {side: spearman(s[side], lengths[side]) for side in sides}
                               for name, s in scores.items()},
        "length_shift": float(np.mean(lengths["policy"]) - np.mean(lengths["reference"])),
        "diversity": {side: diversity(completions[side]) for side in sides},
        "disagreement_rate": None,
    }
    if gold:
        result["disagreement_rate"] = disagreement_rate(scores[proxy]["policy"], scores[proxy]["reference"],
                                                        scores[gold]["policy"], scores[gold]["reference"])
    return result


def overoptimization_points(report: dict) -> list[dict]:
    """(step, KL, proxy, gold) per checkpoint, starting from the reference itself at KL 0."""
    proxy, gold = report["proxy"], report["gold"]
    first = report["checkpoints"][0]["rewards"]
    points = [{"step": 0, "kl": 0.0, "proxy": first[proxy]["reference"],
               "gold": first[gold]["reference"] if gold else None}]
    for r in report["checkpoints"]:
        points.append({"step": r["step"], "kl": max(r["kl"]["exact"]["mean"], 0.0),  # exact KL is >= 0 up to rounding
                       "proxy": r["rewards"][proxy]["policy"], "gold": r["rewards"][gold]["policy"] if gold else None})
    return points


def recommend(points: list[dict], kl_budget: float, by: str) -> dict | None:
    """The point (step 0 = the reference) with the highest mean `by` score whose KL is within the budget,
    with `by` recorded in it.

    points: [{"step", "kl", by: {"mean", ...}}, ...] as the over-optimisation plot draws them; kl_budget <= 0
    means no budget. None when no point fits.
    """
    allowed = [p for p in points if kl_budget <= 0 or p["kl"] <= kl_budget]
    best = max(allowed, key=lambda p: p[by]["mean"], default=None)
    return None if best is None else {**best, "by": by}
